"""A real control server for tests, and the model folders its tests push.

The fixtures built on these (``server``, ``quick_server``, ``start_server``,
``make_model``) are in tests/control/conftest.py; tests elsewhere (tests/truss/) use
:class:`ControlServer` directly. Replicas are real processes: ``bdn serve``, or
``replica_standin.py``, which speaks the same replica contract and starts in a fraction
of the time. Model folders block in ``load()`` or ``predict()`` until a gate file
exists, so a test can hold a replica in its cold start (or a request in flight) for
exactly as long as it needs, without sleeping.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.procs import ServiceProcess, bdn_command

API_KEY = "test-key-0123456789"
STANDIN = Path(__file__).parents[1] / "control" / "replica_standin.py"
POLL_S = 0.02


def real_serve_available() -> bool:
    """Whether ``bdn serve`` exists (a broken serving package fails loudly, not quietly)."""
    if os.environ.get("BDN_TEST_REPLICA") == "standin":
        return False
    try:
        importlib.import_module("serving.cli")
    except ModuleNotFoundError as e:
        if e.name in ("serving", "serving.cli"):
            return False
        raise
    return True


def replica_command(replica: str = "serve") -> str | None:
    """None to use the server's default (``bdn serve``), else the stand-in's command."""
    if replica == "serve" and real_serve_available():
        return None
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(STANDIN))}"


MODEL_TEMPLATE = '''
import os
import time

LOAD_GATE = {load_gate!r}
PREDICT_GATE = {predict_gate!r}
STREAM_GATE = {stream_gate!r}
FAIL_LOAD = {fail_load!r}
VERSION = {version!r}


class Model:
    def __init__(self, **kwargs):
        pass

    def load(self):
        while LOAD_GATE and not os.path.exists(LOAD_GATE):
            time.sleep(0.005)
        if FAIL_LOAD:
            raise RuntimeError("load failed on purpose")

    def predict(self, model_input):
        if isinstance(model_input, dict) and model_input.get("stream"):
            return self.stream()
        while PREDICT_GATE and not os.path.exists(PREDICT_GATE):
            time.sleep(0.005)
        return {{"version": VERSION, "replica": os.environ.get("BDN_REPLICA_ID"),
                "deployment": os.environ.get("BDN_DEPLOYMENT_ID"),
                "environment": os.environ.get("BDN_ENVIRONMENT"), "input": model_input}}

    def stream(self):
        yield "first\\n"
        while not os.path.exists(STREAM_GATE):
            time.sleep(0.005)
        yield "second\\n"
'''


@dataclass
class ModelFolder:
    path: Path
    load_gate: Path
    predict_gate: Path
    stream_gate: Path

    def open_load(self) -> None:
        self.load_gate.touch()

    def open_predict(self) -> None:
        self.predict_gate.touch()

    def open_stream(self) -> None:
        self.stream_gate.touch()


class HttpResult:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class ControlServer:
    """A ``bdn control-server`` process and a tiny HTTP helper bound to it."""

    def __init__(self, state_dir: Path, *extra: str, replica: str = "serve",
                 env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        args = ["control-server", "--listen", "127.0.0.1:0", "--state-dir", str(state_dir),
                "--tick-interval-s", "0.05", "--time-scale", "20", *extra]
        if "--store" not in extra:  # never the default store under the tester's HOME
            args += ["--store", str(state_dir / "store")]
        cmd = replica_command(replica)
        if cmd is not None:
            args += ["--replica-command", cmd]
        self.proc = ServiceProcess(bdn_command(*args),
                                   env={"BDN_API_KEY": API_KEY, **(env or {})})
        assert self.proc.url is not None
        self.url = self.proc.url

    def stop(self) -> None:
        self.proc.stop()

    def call(self, method: str, path: str, body: Any = None, *, key: str | None = API_KEY,
             headers: dict[str, str] | None = None, timeout_s: float = 120) -> HttpResult:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if key is not None:
            req.add_header("Authorization", f"Api-Key {key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return HttpResult(resp.status, resp.read())
        except urllib.error.HTTPError as e:
            return HttpResult(e.code, e.read())

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        r = self.call(method, path, body)
        assert 200 <= r.status < 300, (r.status, r.body, self.proc.output[-3000:])
        return r.json()

    def push(self, model: ModelFolder, *, name: str = "echo", settings: dict | None = None,
             deployment_name: str | None = None) -> tuple[str, str]:
        models = [m for m in self.ok("GET", "/v1/models")["models"] if m["name"] == name]
        model_id = models[0]["id"] if models else self.ok("POST", "/v1/models",
                                                          {"name": name})["id"]
        body: dict[str, Any] = {"model_dir": str(model.path)}
        if settings:
            body["autoscaling_settings"] = settings
        if deployment_name:
            body["name"] = deployment_name
        dep = self.ok("POST", f"/v1/models/{model_id}/deployments", body)
        return model_id, dep["id"]

    def deployment(self, model_id: str, dep_id: str) -> dict[str, Any]:
        return dict(self.ok("GET", f"/v1/models/{model_id}/deployments/{dep_id}"))

    def metrics(self) -> str:
        return self.call("GET", "/metrics", key=None).body.decode()

    def metric(self, name: str, dep_id: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(name + "{") and f'deployment_id="{dep_id}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    @staticmethod
    def answers(url: str) -> bool:
        """Whether anything still listens at a replica's URL."""
        try:
            with urllib.request.urlopen(url + "/health/live", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float = 60) -> None:
        """A bounded poll on a condition of the server's state."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            if self.proc.proc.poll() is not None:
                raise AssertionError(f"control server exited:\n{self.proc.output[-3000:]}")
            time.sleep(POLL_S)
        raise AssertionError(f"timed out waiting for {what}:\n{self.proc.output[-3000:]}")
