"""Rolling promotions end to end: a real control server, stand-in replicas, steady traffic.

The stand-in model answers with the id of the deployment that served the request, so
the traffic split is measured from responses. The server runs at ``--time-scale 20``:
a stabilization time of 20 s passes in one second of wall time. Every wait is on an
observed status (the environment's ``in_progress_promotion``) or on a number of
responses; none is a sleep. Steady traffic is a bounded client loop on two threads; every
request it makes must succeed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import metrics as prom_text
from tests.support.control import ControlServer

pytestmark = pytest.mark.slow

FOUR = {"min_replica": 4, "max_replica": 4}
STABILIZATION_S = 20
# What STABILIZATION_S takes in wall time at the test server's --time-scale 20.
STABILIZATION_WALL_S = STABILIZATION_S / 20
SURGE_25 = {"rolling_deploy": True, "rolling_deploy_config": {
    "max_surge_percent": 25, "max_unavailable_percent": 0,
    "stabilization_time_seconds": STABILIZATION_S, "replica_overhead_percent": 0}}
# Responses a measured split is computed over: 5 points of 100 are a few requests.
WINDOW_RESPONSES = 80
TOLERANCE_POINTS = 5.0
MAX_TRAFFIC_REQUESTS = 200_000


@dataclass(frozen=True)
class Answer:
    sent_s: float
    received_s: float
    status: int
    deployment: str | None
    body: bytes


class Traffic:
    """Steady traffic to an environment: a bounded loop per thread, every answer kept."""

    def __init__(self, srv: ControlServer, model_id: str, threads: int = 2) -> None:
        self.srv = srv
        self.path = f"/models/{model_id}/production/predict"
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True)
                        for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        for _ in range(MAX_TRAFFIC_REQUESTS):
            if self.stopping.is_set():
                return
            sent = time.monotonic()
            r = self.srv.call("POST", self.path, {"n": 1}, timeout_s=60)
            deployment = r.json().get("deployment") if r.status == 200 else None
            with self.lock:
                self.answers.append(Answer(sent, time.monotonic(), r.status, deployment,
                                           r.body))

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=120)

    def since(self, t0: float, t1: float = float("inf")) -> list[Answer]:
        with self.lock:
            return [a for a in self.answers if a.sent_s >= t0 and a.received_s <= t1]

    def failures(self) -> list[Answer]:
        with self.lock:
            return [a for a in self.answers if a.status != 200]


def percent_to(answers: list[Answer], dep_id: str) -> float:
    return 100.0 * sum(a.deployment == dep_id for a in answers) / len(answers)


class Env:
    """The production environment of one model, seen through the management API."""

    def __init__(self, srv: ControlServer, model_id: str) -> None:
        self.srv = srv
        self.model_id = model_id
        self.path = f"/v1/models/{model_id}/environments/production"

    def detail(self) -> dict[str, Any]:
        return dict(self.srv.ok("GET", self.path))

    def promotion(self) -> dict[str, Any]:
        return dict(self.detail()["in_progress_promotion"] or {})

    def wait(self, status: str, percent: float | None = None, timeout_s: float = 90) -> None:
        def check() -> bool:
            p = self.promotion()
            return p.get("status") == status and (
                percent is None or p.get("percent_traffic_to_new_version") == percent)
        self.srv.wait_for(f"promotion {status} at {percent} %", check, timeout_s)

    def act(self, action: str) -> dict[str, Any]:
        return dict(self.srv.ok("POST", f"{self.path}/{action}_promotion"))

    def promote(self, dep_id: str) -> None:
        self.srv.ok("POST", f"{self.path}/promote", {"deployment_id": dep_id})

    def desired(self, dep_id: str) -> int:
        return int(self.srv.deployment(self.model_id, dep_id)["desired_replica_count"])

    def ready(self, dep_id: str) -> int:
        return int(self.srv.deployment(self.model_id, dep_id)["active_replica_count"])


def measure(srv: ControlServer, traffic: Traffic, *, at_least_s: float = 0.0,
            still: Callable[[], bool] | None = None) -> list[Answer]:
    """The answers to requests sent from now until WINDOW_RESPONSES of them (and at least
    ``at_least_s`` of wall time) have come back; ``still`` must hold at the end."""
    t0 = time.monotonic()
    srv.wait_for(f"{WINDOW_RESPONSES} answers", lambda: len(traffic.since(t0)) >= WINDOW_RESPONSES
                 and time.monotonic() - t0 >= at_least_s, timeout_s=120)
    t1 = time.monotonic()
    if still is not None:
        assert still()
    return traffic.since(t0, t1)


def serving_four(srv: ControlServer, make_model: Any, versions: int) -> tuple[str, list[str]]:
    """A model whose production runs deployment 1 on 4 replicas, with rolling deploys on
    (surge 25 %), and further deployments pushed (not running)."""
    models = [make_model("roll", version=v) for v in range(1, versions + 1)]
    model_id, first = srv.push(models[0], name="roll")
    env = Env(srv, model_id)
    srv.ok("PATCH", env.path, {"autoscaling_settings": FOUR})
    env.promote(first)
    env.wait("SUCCEEDED", 100.0)
    srv.wait_for("4 ready replicas", lambda: env.ready(first) == 4)
    patched = srv.ok("PATCH", env.path, {"promotion_settings": SURGE_25})
    assert patched["status"] == "ACCEPTED"
    assert patched["promotion_settings"]["rolling_deploy"] is True
    assert patched["promotion_settings"]["rolling_deploy_config"] == SURGE_25[
        "rolling_deploy_config"]
    assert patched["promotion_settings"]["promotion_cleanup_strategy"] == "SCALE_TO_ZERO"
    assert env.detail()["promotion_settings"] == patched["promotion_settings"]
    return model_id, [first] + [srv.push(m, name="roll")[1] for m in models[1:]]


def test_rolling_promotion_steps_pause_resume_cancel_and_force_roll_forward(
        tmp_path: Path, make_model: Any, start_server: Any) -> None:
    srv = start_server(tmp_path / "state", replica="standin")
    model_id, (d1, d2, d3) = serving_four(srv, make_model, 3)
    env = Env(srv, model_id)
    traffic = Traffic(srv, model_id)
    try:
        # Run 1: 4 replicas, surge 25 %: the candidate goes 1, 2, 3, 4 replicas and
        # 25, 50, 75, 100 % of the traffic. A pause asked for during the first step takes
        # effect once it completes; each step is measured while paused, for at least a
        # stabilization period, and the split holds.
        env.promote(d2)
        answer = env.act("pause")
        assert answer["status"] in ("RELEASING", "RAMPING_UP"), answer
        assert "after the current step" in answer["message"]
        for step, percent in ((1, 25.0), (2, 50.0), (3, 75.0)):
            env.wait("PAUSED", percent)
            # Autoscaling is frozen: both deployments hold the planner's counts.
            assert (env.desired(d1), env.desired(d2)) == (4 - step, step)
            answers = measure(srv, traffic, at_least_s=1.5 * STABILIZATION_WALL_S,
                              still=lambda p=percent: (env.promotion()["status"], env.promotion()[
                                  "percent_traffic_to_new_version"]) == ("PAUSED", p))
            measured = percent_to(answers, d2)
            assert abs(measured - percent) <= TOLERANCE_POINTS, (step, measured, len(answers))
            assert {a.deployment for a in answers} == {d1, d2}
            assert env.act("resume")["status"] in ("RAMPING_UP", "SUCCEEDED")
            if step < 3:
                assert env.act("pause")["status"] == "RAMPING_UP"
        env.wait("SUCCEEDED", 100.0)
        detail = env.detail()
        assert detail["current_deployment"]["id"] == d2
        assert detail["previous_deployment_id"] == d1
        assert percent_to(measure(srv, traffic), d2) == 100.0
        # Cleanup: the previous deployment is scaled to zero (the default strategy).
        srv.wait_for("the previous deployment at zero", lambda: env.ready(d1) == 0)
        assert env.desired(d1) == 0

        # Run 2: canceled at 50 %: traffic ramps back (RAMPING_DOWN) to all on d2.
        env.promote(d3)
        env.wait("RAMPING_UP", 50.0)
        assert env.act("cancel")["status"] == "RAMPING_DOWN"
        env.wait("CANCELED", 0.0)
        assert env.detail()["current_deployment"]["id"] == d2
        assert percent_to(measure(srv, traffic), d2) == 100.0
        srv.wait_for("the canceled candidate at zero", lambda: env.desired(d3) == 0)

        # Run 3: canceled, then forced forward during the ramp-down: SUCCEEDED.
        env.promote(d3)
        env.wait("RAMPING_UP", 50.0)
        assert env.act("cancel")["status"] == "RAMPING_DOWN"
        answer = env.act("force_roll_forward")
        assert answer["status"] == "SUCCEEDED", answer
        env.wait("SUCCEEDED", 100.0)
        assert env.detail()["current_deployment"]["id"] == d3
        assert percent_to(measure(srv, traffic), d3) == 100.0
        # Autoscaling is back: d3 fills up to its min_replica (4) again.
        srv.wait_for("d3 back at 4 replicas", lambda: env.ready(d3) == 4)
    finally:
        traffic.stop()
    assert traffic.failures() == [], traffic.failures()[:3]
    assert len(traffic.answers) > 4 * WINDOW_RESPONSES
    metrics = srv.metrics()
    assert prom_text.samples(metrics, "bdn_requests_total", environment="production",
                             code="200")
    assert prom_text.value(metrics, "bdn_promotion_percent_traffic_to_new_version",
                           model_id=model_id, environment="production") == 100


def test_a_rolling_promotion_continues_after_a_control_plane_restart(
        tmp_path: Path, make_model: Any, start_server: Any) -> None:
    state = tmp_path / "state"
    srv = start_server(state, replica="standin")
    model_id, (d1, d2, d3) = serving_four(srv, make_model, 3)
    env = Env(srv, model_id)
    traffic = Traffic(srv, model_id)
    try:
        env.promote(d2)
        env.act("pause")
        env.wait("PAUSED", 25.0)
    finally:
        traffic.stop()
    srv.stop()

    # A new control server on the same state: the promotion is still at its step (the
    # local backend's replicas did not survive; they start again at the step's counts).
    srv = start_server(state, replica="standin")
    env = Env(srv, model_id)
    env.wait("PAUSED", 25.0)
    srv.wait_for("3 + 1 ready replicas", lambda: (env.ready(d1), env.ready(d2)) == (3, 1))
    promotion = env.promotion()
    assert promotion["step"] == 1 and promotion["deployment_id"] == d2
    assert promotion["previous_deployment_id"] == d1
    assert (env.desired(d1), env.desired(d2)) == (3, 1)
    after = Traffic(srv, model_id)
    try:
        measured = percent_to(measure(srv, after), d2)
        assert abs(measured - 25.0) <= TOLERANCE_POINTS, measured
        assert env.act("resume")["status"] == "RAMPING_UP"
        env.wait("SUCCEEDED", 100.0)
        assert env.detail()["current_deployment"]["id"] == d2
        assert percent_to(measure(srv, after), d2) == 100.0
        env.promote(d3)
        env.act("pause")
        env.wait("PAUSED", 25.0)
    finally:
        after.stop()
    assert traffic.failures() == [] and after.failures() == [], (
        traffic.failures()[:3], after.failures()[:3])
    srv.stop()

    # A saved state that cannot be read (here: from a future version) ends the promotion
    # FAILED at the next start, saying why; the previous deployment keeps the traffic.
    db = sqlite3.connect(state / "control.sqlite3")
    saved = json.loads(db.execute("SELECT promotion FROM environments WHERE model_id = ? "
                                  "AND name = 'production'", (model_id,)).fetchone()[0])
    assert saved["rolling"] is True and saved["state"]["step"] == 1
    saved["state"]["version"] = 99
    db.execute("UPDATE environments SET promotion = ? WHERE model_id = ?",
               (json.dumps(saved), model_id))
    db.commit()
    db.close()
    srv = start_server(state, replica="standin")
    env = Env(srv, model_id)
    promotion = env.promotion()
    assert promotion["status"] == "FAILED" and "saved state" in promotion["error"]
    assert env.detail()["current_deployment"]["id"] == d2
    srv.wait_for("d2 back at 4 replicas", lambda: env.ready(d2) == 4)
    assert env.desired(d3) == 0
    assert srv.ok("POST", f"/models/{model_id}/production/predict", {})["deployment"] == d2


def test_unavailable_mode_removes_before_adding_and_serves_throughout(
        quick_server: Any, make_model: Any) -> None:
    srv = quick_server
    v1, v2 = make_model("unavail", version=1), make_model("unavail", version=2)
    model_id, d1 = srv.push(v1, name="unavail")
    _, d2 = srv.push(v2, name="unavail")
    env = Env(srv, model_id)
    srv.ok("PATCH", env.path, {"autoscaling_settings": {"min_replica": 2, "max_replica": 2}})
    env.promote(d1)
    env.wait("SUCCEEDED", 100.0)
    srv.wait_for("2 ready replicas", lambda: env.ready(d1) == 2)
    srv.ok("PATCH", env.path, {"promotion_settings": {"rolling_deploy": True,
                                                      "rolling_deploy_config": {
        "max_surge_percent": 0, "max_unavailable_percent": 50,
        "stabilization_time_seconds": STABILIZATION_S}}})
    traffic = Traffic(srv, model_id)
    try:
        env.promote(d2)
        env.act("pause")
        env.wait("PAUSED", 50.0)
        promotion = env.promotion()
        assert promotion["mode"] == "unavailable" and promotion["replicas_per_step"] == 1
        # One replica moved: the previous deployment gave it up, the candidate took it.
        assert (env.desired(d1), env.desired(d2)) == (1, 1)
        measured = percent_to(measure(srv, traffic), d2)
        assert abs(measured - 50.0) <= TOLERANCE_POINTS, measured
        env.act("resume")
        env.wait("SUCCEEDED", 100.0)
        assert percent_to(measure(srv, traffic), d2) == 100.0
    finally:
        traffic.stop()
    assert traffic.failures() == [], traffic.failures()[:3]


def test_a_candidate_that_cannot_start_fails_the_rolling_promotion_and_traffic_stays(
        quick_server: Any, make_model: Any) -> None:
    srv = quick_server
    v1, broken = make_model("rollfail", version=1), make_model("rollfail", fail_load=True)
    model_id, d1 = srv.push(v1, name="rollfail")
    _, d2 = srv.push(broken, name="rollfail")
    env = Env(srv, model_id)
    srv.ok("PATCH", env.path, {"autoscaling_settings": {"min_replica": 2, "max_replica": 2},
                               "promotion_settings": {"rolling_deploy": True,
                                                      "rolling_deploy_config": {
                                                          "max_surge_percent": 50}}})
    env.promote(d1)
    env.wait("SUCCEEDED", 100.0)
    srv.wait_for("2 ready replicas", lambda: env.ready(d1) == 2)
    traffic = Traffic(srv, model_id)
    try:
        env.promote(d2)
        env.wait("FAILED", 0.0, timeout_s=120)
        t0 = time.monotonic()
        srv.wait_for("more answers", lambda: len(traffic.since(t0)) >= WINDOW_RESPONSES)
    finally:
        traffic.stop()
    assert "failed to start" in env.promotion()["error"]
    assert env.detail()["current_deployment"]["id"] == d1
    assert {a.deployment for a in traffic.answers} == {d1}
    assert traffic.failures() == [], traffic.failures()[:3]
    # Autoscaling is back for both: the candidate no longer tries to start.
    srv.wait_for("the candidate at zero", lambda: env.desired(d2) == 0)
    assert env.desired(d1) == 2


def test_deleting_an_environment_mid_rollout_hands_both_deployments_back(
        quick_server: Any, make_model: Any) -> None:
    srv = quick_server
    v1, v2 = make_model("envdel", version=1), make_model("envdel", version=2)
    model_id, d1 = srv.push(v1, name="envdel")
    _, d2 = srv.push(v2, name="envdel")
    # An environment created with its settings: 2 replicas, rolling at 50 %.
    created = srv.ok("POST", f"/v1/models/{model_id}/environments", {
        "name": "staging", "autoscaling_settings": {"min_replica": 2, "max_replica": 2},
        "promotion_settings": {"rolling_deploy": True, "rolling_deploy_config": {
            "max_surge_percent": 50, "stabilization_time_seconds": STABILIZATION_S}}})
    assert created["promotion_settings"]["rolling_deploy"] is True
    path = f"/v1/models/{model_id}/environments/staging"
    srv.ok("POST", f"{path}/promote", {"deployment_id": d1})
    srv.wait_for("d1 serving staging", lambda: (srv.ok("GET", path)["in_progress_promotion"]
                                                ["status"]) == "SUCCEEDED")
    srv.ok("POST", f"{path}/promote", {"deployment_id": d2})
    srv.ok("POST", f"{path}/pause_promotion")
    srv.wait_for("paused at 50 %", lambda: (srv.ok("GET", path)["in_progress_promotion"][
        "status"]) == "PAUSED")
    assert srv.deployment(model_id, d1)["desired_replica_count"] == 1
    srv.ok("DELETE", path)
    assert srv.call("GET", path).status == 404
    # The candidate is scaled to zero; the previous one is the autoscaler's again, which
    # brings it back to its min_replica.
    srv.wait_for("d2 at zero, d1 at 2", lambda: (
        srv.deployment(model_id, d2)["desired_replica_count"],
        srv.deployment(model_id, d1)["desired_replica_count"]) == (0, 2))
    assert prom_text.samples(srv.metrics(), "bdn_promotion_percent_traffic_to_new_version",
                             environment="staging") == []


def test_actions_without_a_rolling_promotion_and_the_rest_of_the_surface(
        quick_server: Any, make_model: Any) -> None:
    srv = quick_server
    v1, stuck = make_model("surface", version=1), make_model("surface", gated_load=True)
    model_id, d1 = srv.push(v1, name="surface")
    env = Env(srv, model_id)
    # No promotion yet: every action is a conflict that says so.
    for action in ("pause", "resume", "cancel", "force_cancel", "force_roll_forward"):
        r = srv.call("POST", f"{env.path}/{action}_promotion")
        assert r.status == 409 and "no promotion" in r.json()["error"], (action, r.body)
    # Settings are validated naming the field and its range; nothing is half-applied.
    bad = srv.call("PATCH", env.path, {
        "autoscaling_settings": {"max_replica": 3},
        "promotion_settings": {"rolling_deploy_config": {"max_surge_percent": 51}}})
    assert bad.status == 400
    assert "promotion_settings.rolling_deploy_config.max_surge_percent" in bad.json()["error"]
    assert "0-50" in bad.json()["error"]
    unknown = srv.call("PATCH", env.path, {"promotion_settings": {"canary": True}})
    assert unknown.status == 400 and "promotion_settings.canary" in unknown.json()["error"]
    assert env.detail()["autoscaling_settings"]["max_replica"] == 1
    cleanup = srv.ok("PATCH", env.path, {"promotion_settings": {
        "promotion_cleanup_strategy": "DEACTIVATE"}})
    assert cleanup["promotion_settings"]["promotion_cleanup_strategy"] == "DEACTIVATE"

    env.promote(d1)
    env.wait("SUCCEEDED", 100.0)
    # A plain promotion (rolling_deploy is off) whose candidate cannot get ready yet:
    # RELEASING; pause and resume apply only to rolling ones; cancel is an instant
    # CANCELED, as documented.
    _, d2 = srv.push(stuck, name="surface")
    env.promote(d2)
    promotion = env.promotion()
    assert promotion["status"] == "RELEASING" and promotion["rolling"] is False
    assert promotion["percent_traffic_to_new_version"] == 0.0
    r = srv.call("POST", f"{env.path}/pause_promotion")
    assert r.status == 409 and "rolling" in r.json()["error"]
    assert env.act("cancel") == {"status": "CANCELED", "message": (
        "the promotion was canceled; all traffic is on the previous deployment")}
    assert env.promotion()["status"] == "CANCELED"
    assert env.detail()["current_deployment"]["id"] == d1
    srv.wait_for("the canceled candidate at zero", lambda: env.desired(d2) == 0)
    stuck.open_load()

    # Rename (names are cosmetic; paths keep the id); the development deployment cannot
    # be renamed; names stay unique per model.
    path = f"/v1/models/{model_id}/deployments/{d2}"
    assert srv.ok("PATCH", path, {"name": "canary-2"})["name"] == "canary-2"
    assert srv.deployment(model_id, d2)["name"] == "canary-2"
    taken = srv.call("PATCH", f"/v1/models/{model_id}/deployments/{d1}", {"name": "canary-2"})
    assert taken.status == 409 and "canary-2" in taken.json()["error"]
    assert srv.call("PATCH", path, {"name": "Not A Name"}).status == 400
    assert srv.call("PATCH", path, {"id": "x"}).status == 400
    dev = srv.ok("POST", f"/v1/models/{model_id}/deployments",
                 {"model_dir": str(v1.path), "development": True})
    r = srv.call("PATCH", f"/v1/models/{model_id}/deployments/{dev['id']}", {"name": "x1"})
    assert r.status == 400 and "development deployment cannot be renamed" in r.json()["error"]

    # An inactive published deployment must be activated before promotion (the seed).
    srv.ok("POST", f"{path}/deactivate")
    r = srv.call("POST", f"{env.path}/promote", {"deployment_id": d2})
    assert r.status == 409 and "inactive" in r.json()["error"] and "/activate" in r.json()[
        "error"]
    # Promoting the development deployment publishes a copy with its own id, which
    # takes the environment; the previous one is cleaned up as configured (DEACTIVATE).
    promoted = srv.ok("POST", f"{env.path}/promote", {"deployment_id": "development"})
    assert promoted["id"] != dev["id"] and promoted["is_development"] is False
    env.wait("SUCCEEDED", 100.0)
    assert env.detail()["current_deployment"]["id"] == promoted["id"]
    assert srv.deployment(model_id, dev["id"])["is_development"] is True
    srv.wait_for("the previous deployment deactivated", lambda: srv.deployment(
        model_id, d1)["status"] == "INACTIVE")


def test_cli_sets_rolling_watches_steps_and_controls_a_promotion(
        quick_server: Any, make_model: Any, monkeypatch: Any, capsys: Any) -> None:
    """``bdn environments update``, ``bdn promote --watch`` and the action flags, run in
    this process through ``bdn.cli.main``."""
    from bdn.cli import main

    srv = quick_server
    monkeypatch.setenv("BDN_CONTROL_URL", srv.url)
    monkeypatch.setenv("BDN_API_KEY", "test-key-0123456789")
    monkeypatch.setenv("COLUMNS", "250")

    def bdn(*args: str, code: int = 0) -> tuple[str, str]:
        capsys.readouterr()
        assert main(list(args)) == code
        out = capsys.readouterr()
        return out.out, out.err

    v1, v2, v3 = (make_model("clirl", version=v) for v in (1, 2, 3))
    model_id, d1 = srv.push(v1, name="clirl")
    env = Env(srv, model_id)
    srv.ok("PATCH", env.path, {"autoscaling_settings": {"min_replica": 2, "max_replica": 2}})
    env.promote(d1)
    env.wait("SUCCEEDED", 100.0)
    _, d2 = srv.push(v2, name="clirl", deployment_name="v2")
    _, d3 = srv.push(v3, name="clirl", deployment_name="v3")

    out = json.loads(bdn("environments", "update", "clirl", "production", "--rolling",
                         "--max-surge-percent", "50", "--stabilization-time-seconds",
                         str(STABILIZATION_S))[0])
    assert out["promotion_settings"]["rolling_deploy"] is True
    assert out["promotion_settings"]["rolling_deploy_config"] == {
        "max_surge_percent": 50, "max_unavailable_percent": 0,
        "stabilization_time_seconds": STABILIZATION_S, "replica_overhead_percent": 0}
    _, err = bdn("environments", "update", "clirl", "production",
                 "--max-unavailable-percent", "60", code=1)
    assert "max_unavailable_percent" in err and "0-50" in err
    listing = bdn("environments", "clirl")[0]
    assert "surge 50%" in listing

    # --watch prints each step with its traffic split until SUCCEEDED.
    _, err = bdn("promote", "clirl", "v2", "--watch")
    assert f"RAMPING_UP step 1/2: 50% of traffic to {d2}" in err, err
    assert "replicas previous 1, candidate 1" in err
    assert f"SUCCEEDED step 2/2: 100% of traffic to {d2}" in err
    assert env.detail()["current_deployment"]["id"] == d2

    # The actions: pause (pending until the step completes), then cancel, watched to the
    # end; with no promotion in progress an action is refused.
    bdn("promote", "clirl", "v3", "--no-wait")
    answer = json.loads(bdn("promote", "clirl", "--pause")[0])
    assert answer["status"] in ("RELEASING", "RAMPING_UP")
    env.wait("PAUSED", 50.0)
    assert env.promotion()["deployment_id"] == d3
    out, err = bdn("promote", "clirl", "--cancel", "--watch")
    assert json.loads(out)["status"] == "RAMPING_DOWN"
    assert "CANCELED" in err and "canceled" in err
    assert env.detail()["current_deployment"]["id"] == d2
    _, err = bdn("promote", "clirl", "--resume", code=1)
    assert "no promotion" in err and "409" in err
    _, err = bdn("promote", "clirl", "v3", "--pause", code=1)
    assert "give no deployment" in err
    # Rename by name or id; the id, and so every path, stays.
    bdn("deployments", "clirl", "--rename", "v3", "v3-canceled")
    assert srv.deployment(model_id, d3)["name"] == "v3-canceled"
    _, err = bdn("deployments", "clirl", "--rename", d3, "v2", code=1)
    assert "already has a deployment named 'v2'" in err
