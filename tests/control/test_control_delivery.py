"""Push to ready, end to end on loopback: Hub → push → mirror → store → agent → replica.

A fresh HOME, no weights placed anywhere beforehand: the weights live only on the Hub
fixture (``HF_ENDPOINT``). ``bdn push`` (the real CLI) sends the model folder; the
control server mirrors and pins the weights; its embedded node agent delivers code and
weights to every replica it starts (real ``bdn serve`` processes following the agent's
event stream). The Hub counts every byte it serves, so the test can show each weight
byte crossed it once across two pushes and three replica starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mirror.fixtures_hf import HubFixture
from tests.support import metrics as prom_text
from tests.support.control import API_KEY, ControlServer, real_serve_available
from tests.support.models import write_model_dir
from tests.support.procs import bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not real_serve_available(),
                                 reason="needs bdn serve (the serving package)")]

MODEL_PY = '''
import os


class Model:
    def __init__(self, **kwargs):
        self._weights = kwargs["weights"]
        self._secrets = kwargs["secrets"]
        self.tensors = None

    def load(self):
        self.tensors = self._weights.load()

    def predict(self, model_input):
        return {
            "tensors": len(self.tensors),
            "api_key": os.environ.get("BDN_API_KEY"),
            "other_secret": os.environ.get("BDN_SECRET_OTHER_MODEL_TOKEN"),
            "greeting": os.environ.get("GREETING"),
            "secret": self._secrets.get("my_token"),
            "environment": os.environ.get("BDN_ENVIRONMENT"),
            "replica": os.environ.get("BDN_REPLICA_ID"),
        }
'''


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubFixture]:
    h = HubFixture(tmp_path / "hub-blobs").start()
    try:
        yield h
    finally:
        h.stop()


def model_folder(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "config.yaml").write_text(textwrap.dedent("""\
        model_name: tiny
        environment_variables:
          GREETING: hello
        secrets:
          my_token: null
        weights:
          - source: hf://acme/tiny@main
            mount_location: /app/weights/tiny
            allow_patterns: ["*.safetensors", "*.json"]
        """))
    (root / "model" / "model.py").write_text(MODEL_PY)
    return root


def run_cli(srv: ControlServer, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "BDN_API_KEY": API_KEY,
           "BDN_CONTROL_URL": srv.url, "COLUMNS": "400"}
    done = subprocess.run(bdn_command(*args), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout, done.stderr, srv.proc.output[-3000:])
    return done


def replicas(srv: ControlServer, model_id: str, dep_id: str) -> list[dict[str, Any]]:
    return list(srv.ok("GET", f"/v1/models/{model_id}/deployments/{dep_id}/replicas")[
        "replicas"])


def ready(srv: ControlServer, model_id: str, dep_id: str) -> list[dict[str, Any]]:
    return [r for r in replicas(srv, model_id, dep_id) if r["state"] == "ready"]


def test_push_mirrors_pins_and_replicas_start_from_the_agent(
        tmp_path: Path, hub: HubFixture, start_server: Any) -> None:
    home = tmp_path / "home"
    home.mkdir()
    write_model_dir(tmp_path / "upstream", layers=2, hidden=64, shards=2)
    hub.state.commit_dir("acme/tiny", tmp_path / "upstream")
    weight_files = {p.name: p.stat().st_size
                    for p in (tmp_path / "upstream").iterdir() if p.suffix == ".safetensors"}
    folder = model_folder(tmp_path / "tiny")
    srv = start_server(tmp_path / "state", env={
        "HOME": str(home), "HF_ENDPOINT": hub.url, "BDN_SECRET_MY_TOKEN": "tok-123456",
        "BDN_SECRET_OTHER_MODEL_TOKEN": "not-for-tiny"})

    # 1. The first push uploads the folder, mirrors the weights and pins them.
    pushed = run_cli(srv, home, "push", str(folder))
    out = json.loads(pushed.stdout.strip().splitlines()[-1])
    model_id, d1 = out["model_id"], out["deployment_id"]
    assert "pinned b3:" in pushed.stderr
    dep = srv.deployment(model_id, d1)
    assert dep["code_manifest"].startswith("b3:")
    assert dep["weights"][0]["manifest"].startswith("b3:")
    assert dep["status"] == "SCALED_TO_ZERO"
    served_after_push = hub.state.bytes_served
    assert served_after_push > sum(weight_files.values()) - 1

    # 2. Predict from zero: the agent delivers code and weights, the replica serves.
    answer = srv.call("POST", f"/models/{model_id}/deployment/{d1}/predict", {})
    assert answer.status == 200, (answer.body, srv.proc.output[-3000:])
    body = answer.json()
    assert body["tensors"] > 0
    # The replica's world: its config's variables and declared secret; nothing of the
    # control server's (no API key, no other model's secret).
    assert body["greeting"] == "hello" and body["secret"] == "tok-123456"
    assert body["api_key"] is None and body["other_secret"] is None
    assert body["environment"] is None  # serves no environment (not promoted)
    [first] = ready(srv, model_id, d1)
    cs = first["cold_start"]
    assert set(cs["phases"]) >= {"slot", "weights", "load", "model_init", "total"}
    assert cs["bytes_by_tier"].get("store", 0) >= sum(weight_files.values())
    assert cs["bytes_by_tier"].get("node", 0) == 0

    # 3. A second replica on the same node starts from the node cache.
    srv.ok("PATCH", f"/v1/models/{model_id}/deployments/{d1}/autoscaling_settings",
           {"min_replica": 2, "max_replica": 2})
    srv.wait_for("two ready replicas", lambda: len(ready(srv, model_id, d1)) == 2,
                 timeout_s=180)
    second = next(r for r in ready(srv, model_id, d1) if r["id"] != first["id"])
    tiers = second["cold_start"]["bytes_by_tier"]
    assert tiers.get("node", 0) >= sum(weight_files.values())
    assert tiers.get("store", 0) == 0 and tiers.get("cluster", 0) == 0

    # Scaling back to one releases only the stopped replica's pulls: the other keeps
    # its shared mount and serves.
    srv.ok("PATCH", f"/v1/models/{model_id}/deployments/{d1}/autoscaling_settings",
           {"min_replica": 1, "max_replica": 1})
    srv.wait_for("one replica", lambda: len(replicas(srv, model_id, d1)) == 1,
                 timeout_s=120)
    again = srv.call("POST", f"/models/{model_id}/deployment/{d1}/predict", {})
    assert again.status == 200
    mounted = list((tmp_path / "state" / "mounts" / d1).glob(
        "*/weights/app/weights/tiny/*.safetensors"))
    assert sorted(p.name for p in mounted) == sorted(weight_files)

    # 4. A second push of the same folder mirrors nothing again, and its replica (the
    # third start) also comes from the node cache.
    pushed = run_cli(srv, home, "push", str(folder))
    d2 = json.loads(pushed.stdout.strip().splitlines()[-1])["deployment_id"]
    assert d2 != d1
    assert srv.deployment(model_id, d2)["weights"] == dep["weights"]
    answer = srv.call("POST", f"/models/{model_id}/deployment/{d2}/predict", {})
    assert answer.status == 200
    [third] = ready(srv, model_id, d2)
    assert third["cold_start"]["bytes_by_tier"].get("store", 0) == 0
    # The Hub served every weight byte exactly once, across two pushes and three starts.
    by_blob = hub.state.stats()["bytes_by_blob"]
    assert hub.state.bytes_served == served_after_push
    for name, size in weight_files.items():
        sha = hashlib.sha256((tmp_path / "upstream" / name).read_bytes()).hexdigest()
        assert by_blob[sha] == size, (name, by_blob)

    # 5. Metrics and `bdn deployments` show the cold starts' phases and tiers.
    metrics = srv.metrics()
    labels = {"model_id": model_id, "deployment_id": d1}
    assert prom_text.value(metrics, "bdn_cold_start_phase_seconds_count", **labels,
                           phase="weights") == 2
    assert prom_text.samples(metrics, "bdn_cold_start_bytes_total", **labels, tier="node")
    table = run_cli(srv, home, "deployments", "tiny").stdout
    assert "weights" in table and "load" in table


def test_published_deployments_stay_pinned_and_development_re_resolves(
        tmp_path: Path, hub: HubFixture, start_server: Any) -> None:
    from control.cli import _push_once
    from control.client import ControlClient
    from control.push import list_folder

    home = tmp_path / "home"
    home.mkdir()
    hub.state.commit("acme/tiny", {"model.safetensors": b"\x00" * 20_000,
                                   "config.json": b"{}"})
    folder = model_folder(tmp_path / "tiny")
    srv = start_server(tmp_path / "state", env={"HOME": str(home), "HF_ENDPOINT": hub.url})
    client = ControlClient(srv.url, API_KEY)

    model, first = _push_once(client, folder, "tiny", name=None, development=False)
    _, dev = _push_once(client, folder, "tiny", name=None, development=True)
    # What was pushed is on the server: an unchanged push uploads nothing.
    digests = sorted({f.digest for f in list_folder(folder)})
    assert srv.ok("POST", "/v1/uploads/missing", {"digests": digests})["missing"] == []
    pinned = first["weights"][0]["manifest"]
    assert dev["weights"][0]["manifest"] == pinned

    # Upstream moves on: main gets a new commit with other weights.
    hub.state.commit("acme/tiny", {"model.safetensors": b"\x01" * 20_000})
    model_id = model["id"]
    _, second = _push_once(client, folder, "tiny", name=None, development=False)
    _, dev_again = _push_once(client, folder, "tiny", name=None, development=True)
    assert second["weights"][0]["manifest"] != pinned
    # The published deployment keeps what it was pinned to; development re-resolved.
    assert srv.deployment(model_id, first["id"])["weights"][0]["manifest"] == pinned
    assert dev_again["id"] == dev["id"]
    assert dev_again["weights"][0]["manifest"] == second["weights"][0]["manifest"]


def test_push_refuses_paths_that_leave_the_folder(tmp_path: Path, start_server: Any) -> None:
    srv = start_server(tmp_path / "state", replica="standin")
    model_id = srv.ok("POST", "/v1/models", {"name": "evil"})["id"]
    for bad in ("../x.py", "/etc/passwd", "a/../../b", "./config.yaml"):
        files = [{"path": "config.yaml", "digest": "0" * 64},
                 {"path": bad, "digest": "1" * 64}]
        r = srv.call("POST", f"/v1/models/{model_id}/deployments", {"files": files})
        assert r.status == 400 and "files[1].path" in r.json()["error"], (bad, r.body)
    # A body that is not what its digest says is refused, and nothing is kept.
    r = srv.call("PUT", "/v1/uploads/" + "2" * 64, None, headers={}, timeout_s=30)
    assert r.status == 400 and "BLAKE3" in r.json()["error"]
    assert not list((tmp_path / "state" / "uploads").iterdir())
