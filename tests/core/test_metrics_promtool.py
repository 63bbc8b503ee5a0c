"""Every service's ``/metrics`` passes ``promtool check metrics``, after real traffic.

Each service runs as a real process on loopback (the cache pod with two worker
processes, an agent that pulled a model through it, a model server that answered
requests, a control server that cold-started a replica and routed to it, a mirror
service that ran a job) and its exposition is checked by Prometheus's own linter: HELP
on every family, ``_total`` on counters, units in names, no duplicate or malformed
series. promtool comes from Debian's ``prometheus`` package (installed by ``.ci/run``);
without it these tests fail rather than skip, so CI cannot pass them vacuously.

The same runs check that one name means one thing across services: a family that
appears in two services has the same type in both.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bdn.metrics import parse_metrics
from bdn.mirror_client import MirrorClient
from bdn.mirror_service import hash_key
from manifests.digest import Digest
from tests.agent.agent_support import Agent, make_model, mirror
from tests.support.control import ControlServer, ModelFolder
from tests.support.procs import ServiceProcess, bdn_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MIRROR_KEY = "bdn_test_key_metrics_0123456789abcdef"
CONTROL_MODEL = textwrap.dedent("""\
    class Model:
        def __init__(self, **kwargs):
            pass

        def load(self):
            pass

        def predict(self, model_input):
            return {"echo": model_input}
    """)


def promtool_check(service: str, text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, (
        "promtool not found: apt-get install --no-install-recommends prometheus")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    problems = (out.stdout + out.stderr).strip()
    assert out.returncode == 0 and not problems, f"{service}: promtool says:\n{problems}"
    # Every registry carries the build info and the process collector's series.
    assert 'bdn_build_info{python="' in text and 'version="' in text, service
    assert "process_cpu_seconds_total" in text, service


def types(text: str) -> dict[str, str]:
    return {parts[2]: parts[3] for parts in (ln.split() for ln in text.splitlines())
            if len(parts) == 4 and parts[:2] == ["#", "TYPE"]}


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.headers.get("Content-Type", "").startswith("text/plain; version=0.0.4")
        return str(r.read().decode())


@pytest.fixture
def procs() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            p.stop()


def test_cache_and_agent_metrics_pass_promtool(tmp_path: Path,
                                               procs: list[ServiceProcess]) -> None:
    store = tmp_path / "store"
    base = mirror(store, make_model(tmp_path / "src"), "test/llama:base")
    # Two worker processes: the owner's totals sum what its workers noted.
    cache = ServiceProcess(bdn_command(
        "cache-server", "--store", str(store), "--dir", str(tmp_path / "cache"),
        "--budget-bytes", "1G", "--listen", "127.0.0.1:0", "--workers", "2"))
    procs.append(cache)
    assert cache.url is not None
    agent = Agent(tmp_path, peers=(cache.url,), store=store)
    procs.append(agent.proc)
    agent.client.wait(agent.client.start_pull(ref=base.ref, mount=str(tmp_path / "m"))["id"])
    # Hits too: the same objects again, straight from the pod.
    obj = next(iter(base.manifest.unique_chunks()))
    for _ in range(4):
        get_object(cache.url, obj)

    text = get(f"{cache.url}/metrics")
    promtool_check("cache-server", text)
    m = parse_metrics(text)
    assert m["bdn_cache_processes"] == 2
    assert m["bdn_cache_hits_total"] >= 4
    per = sum(v for k, v in m.items() if k.startswith("bdn_cache_process_hits_total{"))
    assert per == m["bdn_cache_hits_total"]

    atext = agent.client.metrics()
    promtool_check("agent", atext)
    am = parse_metrics(atext)
    delivered = sum(v for k, v in am.items()
                    if k.startswith("bdn_agent_delivered_bytes_total{"))
    assert delivered == base.manifest.unique_size
    assert am["bdn_agent_pulls_done_total"] == 1


def get_object(url: str, digest: Digest) -> bytes:
    with urllib.request.urlopen(f"{url}/v1/objects/{digest}", timeout=30) as r:
        return bytes(r.read())


def test_serve_and_control_metrics_pass_promtool_with_one_type_per_name(
        tmp_path: Path, procs: list[ServiceProcess]) -> None:
    model = tmp_path / "serve-model"
    (model / "model").mkdir(parents=True)
    (model / "model" / "model.py").write_text(CONTROL_MODEL)
    (model / "config.yaml").write_text("model_name: echo\n")
    serve = ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0"))
    procs.append(serve)
    serve.wait_line("BDN_READY")
    for i in range(3):
        req = urllib.request.Request(f"{serve.url}/predict", data=f'{{"n": {i}}}'.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
    stext = get(f"{serve.url}/metrics")
    promtool_check("serve", stext)
    sm = parse_metrics(stext)
    assert sm['bdn_requests_total{code="200"}'] == 3
    assert sm["bdn_cold_start_seconds_count"] == 1
    assert sm['bdn_cold_start_phase_seconds_count{phase="model_init"}'] == 1

    folder = tmp_path / "control-model"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.py").write_text(CONTROL_MODEL)
    (folder / "config.yaml").write_text("model_name: echo\nweights: []\nresources: {}\n")
    srv = ControlServer(tmp_path / "control", replica="standin")
    procs.append(srv.proc)
    model_id, dep_id = srv.push(ModelFolder(folder, tmp_path / "g1", tmp_path / "g2",
                                            tmp_path / "g3"))
    r = srv.call("POST", f"/models/{model_id}/deployment/{dep_id}/predict", {"n": 1})
    assert r.status == 200, r.body
    ctext = get(f"{srv.url}/metrics")
    promtool_check("control-server", ctext)
    assert srv.metric("bdn_cold_start_seconds_count", dep_id) == 1
    assert srv.metric("bdn_cold_start_phase_seconds_count", dep_id) == 1

    # One name, one type: what both expose is the same kind of metric in both.
    stypes, ctypes = types(stext), types(ctext)
    shared = {n for n in stypes.keys() & ctypes.keys() if n.startswith("bdn_")}
    assert {"bdn_cold_start_seconds", "bdn_cold_start_phase_seconds",
            "bdn_requests_total"} <= shared
    assert {n: (stypes[n], ctypes[n]) for n in shared if stypes[n] != ctypes[n]} == {}


def test_mirror_service_metrics_pass_promtool(tmp_path: Path,
                                              procs: list[ServiceProcess]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(bytes(range(256)) * 64)
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - name: t\n    sha256: {hash_key(MIRROR_KEY)}\n"
                    "    namespaces: [team]\n")
    svc = ServiceProcess(bdn_command(
        "mirror-server", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "store"),
        "--state-dir", str(tmp_path / "state"), "--keys", str(keys),
        "--allow-local-root", str(tmp_path)))
    procs.append(svc)
    assert svc.url is not None
    client = MirrorClient(svc.url, MIRROR_KEY)
    done = client.wait(client.submit({"source": f"file://{src}"}, "team/m:v1")["id"],
                       timeout_s=60)
    assert done["state"] == "succeeded"
    text = get(f"{svc.url}/metrics")
    promtool_check("mirror-server", text)
    m = parse_metrics(text)
    assert m['bdn_mirror_jobs_ended_total{state="succeeded"}'] == 1
    assert m["bdn_mirror_bytes_total"] == 256 * 64
