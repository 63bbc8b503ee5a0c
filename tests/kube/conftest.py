"""A real Kubernetes control plane and stand-in GPU nodes, once per test module.

``cluster`` starts etcd, kube-apiserver, controller-manager and scheduler
(tests/support/kube.py) and the stand-in kubelet (tests/kube_standin.py) with two L4
nodes; the tests skip with one line where the binaries are absent. Each test works in its
own namespace (``namespace``), so tests of one module share the cluster without seeing
each other's objects.
"""

from __future__ import annotations

import random
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kube import NODES, Lab, kube_cluster, require_kube
from tests.support.procs import ServiceProcess

STANDIN = Path(__file__).resolve().parents[1] / "kube_standin.py"
GPUS_PER_NODE = 8
SA_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_kube()
    work = tmp_path_factory.mktemp("kube")
    with kube_cluster(work / "cluster") as cluster:
        # A private 127.A.B.0/24 per module: pods of concurrent test runs never collide.
        ip_prefix = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}"
        argv = [sys.executable, str(STANDIN), "--kubeconfig", str(cluster.kubeconfig),
                "--gpus", str(GPUS_PER_NODE), "--ip-prefix", ip_prefix,
                "--label", "bdn.dev/accelerator=L4", "--label", "nvidia.com/gpu.present=true",
                "--taint", "nvidia.com/gpu=present:NoSchedule",
                # The agent's hostPaths are this machine's /var/lib/bdn and /run/bdn.
                "--simulate", "app.kubernetes.io/component=agent"]
        for node in NODES:
            argv += ["--node", node]
        kubelet = ServiceProcess(argv, ready_prefix="KUBE_STANDIN_READY")
        api = cluster.api_client()
        try:
            node_root = work / "node"
            (node_root / "run").mkdir(parents=True)
            (node_root / "mounts").mkdir(parents=True)
            yield Lab(cluster, kubelet, api, ip_prefix, node_root)
        finally:
            api.close()
            kubelet.stop()


@pytest.fixture
def namespace(lab: Lab) -> Iterator[str]:
    """A fresh namespace with its default ServiceAccount (pods are refused without it)."""
    from kubernetes import client, watch

    core = client.CoreV1Api(lab.api)
    name = f"t-{secrets.token_hex(4)}"
    core.create_namespace({"metadata": {"name": name}})
    w = watch.Watch()
    found = False
    for ev in w.stream(core.list_namespaced_service_account, name,
                       field_selector="metadata.name=default", timeout_seconds=SA_TIMEOUT_S):
        if ev["type"] in ("ADDED", "MODIFIED"):
            found = True
            w.stop()
    assert found, f"no default ServiceAccount in {name} within {SA_TIMEOUT_S} s"
    yield name
    core.delete_namespace(name)
