"""A real Kubernetes control plane for tests: etcd, kube-apiserver, controller-manager and
scheduler on free loopback ports, stopped by PID.

The binaries are the v1.20.2 control plane unpacked from ``shared/kube`` (found by
walking up from the repository, or ``BDN_KUBE_BIN``/``BDN_KUBE_SHARED``), or built with
``make kube-bin``; etcd is Debian's ``etcd-server``. Where any is missing the tests skip
with one line saying how to get them. There is no kubelet: ``tests/kube_standin.py``
registers nodes and runs pods as local processes.

Start-up costs 5-20 s, so tests start one cluster per module and keep their objects
apart by namespace. Authentication is one admin token (``--token-auth-file``); the
apiserver signs its own serving certificate, which clients trust by file (the
controller-manager and scheduler through a kubeconfig, the Python client through its
``ssl_ca_cert``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import ServiceProcess, free_port

REPO = Path(__file__).resolve().parents[2]
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
DEFAULT_BIN_DIR = Path.home() / ".cache" / "bdn-kube" / "bin"
HOW_TO_GET = ("Kubernetes control-plane binaries absent: run `make kube-bin` (unpacks "
              "shared/kube, or builds them from Debian's source in ~15 min) and "
              "`apt-get install etcd-server`")
ETCD_START_TIMEOUT_S = 30.0
# Measured: 5 s alone, up to 21 s on a loaded 2-core machine.
APISERVER_START_TIMEOUT_S = 90.0
PROBE_INTERVAL_S = 0.1


def _shared_kube() -> Path | None:
    env = os.environ.get("BDN_KUBE_SHARED")
    if env:
        return Path(env) if (Path(env) / "unpack.sh").is_file() else None
    for parent in REPO.parents:
        candidate = parent / "shared" / "kube" / "unpack.sh"
        if candidate.is_file():
            return candidate.parent
    return None


def kube_bin_dir() -> Path | None:
    """The folder holding the three binaries, unpacking shared/kube if needed; else None."""
    env = os.environ.get("BDN_KUBE_BIN")
    candidates = [Path(env)] if env else [DEFAULT_BIN_DIR]
    for d in candidates:
        if all((d / b).is_file() for b in BINARIES):
            return d
    shared = _shared_kube()
    if shared is None:
        return None
    out = subprocess.run([str(shared / "unpack.sh"), str(candidates[0])], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return Path(out)


def require_kube() -> tuple[Path, str]:
    """(binaries folder, etcd path), or skip the calling test/module with how to get them."""
    bins = kube_bin_dir()
    etcd = shutil.which("etcd")
    if bins is None or etcd is None:
        pytest.skip(HOW_TO_GET)
    return bins, etcd


def _probe(url: str, *, token: str | None = None, ctx: ssl.SSLContext | None = None,
           timeout_s: float, proc: ServiceProcess) -> None:
    """Wait until ``url`` answers 200 (these servers print no ready line we could trust)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.cmd[0]} exited:\n{proc.output[-4000:]}")
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(PROBE_INTERVAL_S)
    raise TimeoutError(f"{url} not ready within {timeout_s:.0f} s ({last}):\n"
                       f"{proc.output[-4000:]}")


@dataclass
class KubeCluster:
    """A running control plane: its URL, admin token, CA file and kubeconfig."""

    url: str
    token: str
    ca_file: Path
    kubeconfig: Path
    procs: list[ServiceProcess] = field(default_factory=list)

    def api_client(self, token: str | None = None) -> Any:
        """A ``kubernetes.client.ApiClient`` with the admin token (or ``token``)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.api_key = {"authorization": f"Bearer {token or self.token}"}
        cfg.ssl_ca_cert = str(self.ca_file)
        # The self-signed serving certificate names "localhost" and 127.0.0.1.
        cfg.verify_ssl = True
        return client.ApiClient(cfg)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


def write_kubeconfig(path: Path, url: str, token: str, ca_file: Path,
                     namespace: str = "default") -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: bdn-test\n  cluster:\n    server: {url}\n"
        f"    certificate-authority: {ca_file}\n"
        "users:\n- name: admin\n  user:\n"
        f"    token: {token}\n"
        "contexts:\n- name: bdn-test\n  context:\n    cluster: bdn-test\n    user: admin\n"
        f"    namespace: {namespace}\n"
        "current-context: bdn-test\n")
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def kube_cluster(work: Path) -> Iterator[KubeCluster]:
    """Start etcd + apiserver + controller-manager + scheduler under ``work``; stop by PID."""
    bins, etcd = require_kube()
    work.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    (work / "tokens.csv").write_text(f"{token},admin,admin,system:masters\n")
    sa_key, sa_pub = work / "sa.key", work / "sa.pub"
    subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
                   check=True, capture_output=True)
    cert_dir = work / "certs"
    cert_dir.mkdir(exist_ok=True)
    cluster = KubeCluster(url="", token=token, ca_file=cert_dir / "apiserver.crt",
                          kubeconfig=work / "kubeconfig")
    try:
        client_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd_proc = ServiceProcess(
            [etcd, "--name", "bdn-test", "--data-dir", str(work / "etcd"),
             "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"bdn-test={peer_url}", "--log-level", "warn"],
            ready_prefix=None)
        cluster.procs.append(etcd_proc)
        _probe(f"{etcd_url}/health", timeout_s=ETCD_START_TIMEOUT_S, proc=etcd_proc)

        port = free_port()
        cluster.url = f"https://127.0.0.1:{port}"
        api = ServiceProcess(
            [str(bins / "kube-apiserver"), f"--etcd-servers={etcd_url}",
             "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
             f"--secure-port={port}", f"--cert-dir={cert_dir}",
             f"--token-auth-file={work / 'tokens.csv'}", "--authorization-mode=RBAC",
             "--service-account-issuer=https://kubernetes.default.svc",
             f"--service-account-key-file={sa_pub}",
             f"--service-account-signing-key-file={sa_key}",
             "--service-cluster-ip-range=10.0.0.0/24", "--enable-priority-and-fairness=false",
             "--logtostderr=true", "--v=0"],
            ready_prefix=None)
        cluster.procs.append(api)
        # The serving certificate is self-signed and written at start-up; until then
        # only reachability counts, then it becomes the CA every client trusts.
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        _probe(f"{cluster.url}/readyz", token=token, ctx=insecure,
               timeout_s=APISERVER_START_TIMEOUT_S, proc=api)
        write_kubeconfig(cluster.kubeconfig, cluster.url, token, cluster.ca_file)
        cluster.procs.append(ServiceProcess(
            [str(bins / "kube-controller-manager"), f"--kubeconfig={cluster.kubeconfig}",
             "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
             "--port=0", f"--service-account-private-key-file={sa_key}",
             f"--root-ca-file={cluster.ca_file}", "--controllers=*",
             "--use-service-account-credentials=false", "--logtostderr=true"],
            ready_prefix=None))
        cluster.procs.append(ServiceProcess(
            [str(bins / "kube-scheduler"), f"--kubeconfig={cluster.kubeconfig}",
             "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
             "--port=0", "--logtostderr=true"],
            ready_prefix=None))
        yield cluster
    finally:
        cluster.stop()


# The stand-in GPU nodes of tests/kube/conftest.py's ``lab`` fixture.
NODES = ("gpu-l4-0", "gpu-l4-1")


@dataclass
class Lab:
    """The cluster, the stand-in kubelet and a node's host folders."""

    cluster: KubeCluster
    kubelet: ServiceProcess
    api: Any
    ip_prefix: str
    node_root: Path
