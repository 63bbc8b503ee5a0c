"""Promotion never hands an environment to a deployment that cannot serve.

At ``min_replica`` 0 a candidate still starts one replica and must reach ready before it
takes the environment; one whose ``load()`` fails ends FAILED, and the environment keeps
serving the deployment it had. Real control server, real stand-in replica processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow


def test_a_broken_candidate_at_min_replica_0_fails_and_production_keeps_serving(
        tmp_path: Path, make_model: Any, start_server: Any) -> None:
    srv = start_server(tmp_path / "state", "--start-retry-backoff-s", "0.05",
                       replica="standin")
    good = make_model("cand", version=1)
    model_id, d1 = srv.push(good, name="cand")
    srv.ok("POST", f"/v1/models/{model_id}/environments/production/promote",
           {"deployment_id": d1})
    env_path = f"/v1/models/{model_id}/environments/production"
    srv.wait_for("the first promotion", lambda: (srv.ok("GET", env_path).get(
        "in_progress_promotion") or {}).get("status") == "SUCCEEDED")
    # The first deployment showed it can serve: one replica came up although
    # min_replica is 0.
    assert srv.deployment(model_id, d1)["autoscaling_settings"]["min_replica"] == 0
    assert srv.ok("GET", env_path)["current_deployment"]["id"] == d1
    assert len(srv.deployment(model_id, d1)["cold_start_seconds"]) == 1

    broken = make_model("cand", version=2, fail_load=True)
    _, d2 = srv.push(broken, name="cand")
    srv.ok("POST", f"/v1/models/{model_id}/environments/production/promote",
           {"deployment_id": d2})
    srv.wait_for("the candidate to fail", lambda: (srv.ok("GET", env_path).get(
        "in_progress_promotion") or {}).get("status") == "FAILED", timeout_s=120)
    env = srv.ok("GET", env_path)
    assert env["current_deployment"]["id"] == d1
    assert "load failed on purpose" in env["in_progress_promotion"]["error"]
    answer = srv.call("POST", f"/models/{model_id}/production/predict", {"x": 1})
    assert answer.status == 200 and answer.json()["version"] == 1
    # The replica learnt the environment it serves (BDN_ENVIRONMENT).
    assert answer.json()["environment"] == "production"
    # The failed candidate stops trying: scaled back to nothing.
    srv.wait_for("the candidate to stop starting replicas", lambda: srv.deployment(
        model_id, d2)["starting_replica_count"] == 0 and srv.deployment(
        model_id, d2)["desired_replica_count"] == 0)
