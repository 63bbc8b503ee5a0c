"""End to end on loopback: a real control server, real replica processes, real HTTP.

The server runs with ``--time-scale 20`` so the documented minimum autoscaling window
(10 s) passes in half a second of wall time; the API still rejects a window under 10.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support import metrics as prom_text
from tests.support.procs import ServiceProcess, bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

FAST_DOWN = {"autoscaling_window": 10, "scale_down_delay": 0}


def predict_path(model_id: str, target: str = "production") -> str:
    return f"/models/{model_id}/{target}/predict"


def test_api_keys_are_required_and_checked(server: Any) -> None:
    for path, method in (("/v1/models", "GET"), ("/models/x/production/predict", "POST")):
        missing = server.call(method, path, {} if method == "POST" else None, key=None)
        assert missing.status == 401 and "API key" in missing.json()["error"]
        wrong = server.call(method, path, {} if method == "POST" else None, key="nope-nope-1")
        assert wrong.status == 401 and "not valid" in wrong.json()["error"]
    assert server.call("GET", "/v1/models").status == 200
    # Metrics and health need no key; the key never shows up in the server's output.
    assert server.call("GET", "/metrics", key=None).status == 200
    assert "test-key-0123456789" not in server.proc.output


def test_scale_from_zero_holds_requests_then_returns_to_zero(server: Any,
                                                             make_model: Any) -> None:
    model = make_model("zero", gated_load=True)
    model_id, dep_id = server.push(model)
    # A published deployment at min_replica 0 waits for its first request. (Promoting it
    # would start one replica: a candidate must show it can serve before it takes an
    # environment.)
    target = f"deployment/{dep_id}"
    dep = server.deployment(model_id, dep_id)
    assert dep["autoscaling_settings"]["min_replica"] == 0
    assert dep["status"] == "SCALED_TO_ZERO" and dep["active_replica_count"] == 0

    # The first request cold-starts a replica; 50 more arrive during that cold start.
    with ThreadPoolExecutor(max_workers=51) as pool:
        first = pool.submit(server.call, "POST", predict_path(model_id, target), {"n": -1})
        server.wait_for("a replica to start", lambda: server.metric(
            "bdn_starting_replicas", dep_id) == 1)
        rest = [pool.submit(server.call, "POST", predict_path(model_id, target), {"n": i})
                for i in range(50)]
        server.wait_for("51 queued requests",
                        lambda: server.metric("bdn_queue_depth", dep_id) == 51)
        assert server.metric("bdn_concurrent_requests", dep_id) == 51
        assert server.deployment(model_id, dep_id)["status"] == "WAKING_UP"
        model.open_load()  # the cold start completes
        results = [first.result(), *(f.result() for f in rest)]
    assert [r.status for r in results] == [200] * 51
    assert sorted(r.json()["input"]["n"] for r in results) == list(range(-1, 50))
    dep = server.deployment(model_id, dep_id)
    assert dep["active_replica_count"] == 1 and len(dep["cold_start_seconds"]) == 1
    replica_url = dep["replicas"][0]["url"]
    metrics = server.metrics()
    assert prom_text.value(metrics, "bdn_cold_start_seconds_count", model_id=model_id,
                           deployment_id=dep_id) == 1
    assert prom_text.value(metrics, "bdn_requests_total", deployment_id=dep_id,
                           code="200") == 51

    # With a small scale-down delay the deployment returns to zero replicas.
    server.ok("PATCH", f"/v1/models/{model_id}/deployments/{dep_id}/autoscaling_settings",
              FAST_DOWN)
    server.wait_for("scale to zero", lambda: server.deployment(model_id, dep_id)[
        "status"] == "SCALED_TO_ZERO")
    server.wait_for("the replica process to exit", lambda: not server.answers(replica_url))
    assert server.metric("bdn_desired_replicas", dep_id) == 0


def test_promotion_keeps_the_url_demotes_and_rolls_back(server: Any, make_model: Any) -> None:
    v1, v2 = make_model("promo", version=1), make_model("promo", version=2, gated_load=True)
    model_id, d1 = server.push(v1, name="promo")
    _, d2 = server.push(v2, name="promo")
    env_path = f"/v1/models/{model_id}/environments/production"
    server.ok("POST", f"{env_path}/promote", {"deployment_id": d1})
    server.wait_for("d1 in production", lambda: (server.ok("GET", env_path)[
        "current_deployment"] or {}).get("id") == d1)
    assert server.ok("POST", predict_path(model_id), {})["version"] == 1
    # Production keeps one replica warm from now on; the environment's settings are what
    # a promoted deployment inherits.
    server.ok("PATCH", env_path, {"autoscaling_settings": {"min_replica": 1, "max_replica": 2,
                                                           **FAST_DOWN}})
    assert server.deployment(model_id, d1)["autoscaling_settings"]["min_replica"] == 1

    promoted = server.ok("POST", f"{env_path}/promote", {"deployment_id": d2})
    assert promoted["id"] == d2
    assert promoted["autoscaling_settings"]["min_replica"] == 1  # inherited
    assert promoted["autoscaling_settings"]["max_replica"] == 2
    # d2 is still cold-starting: one promotion per environment at a time.
    env = server.ok("GET", env_path)
    assert env["in_progress_promotion"]["status"] == "RELEASING"
    again = server.call("POST", f"{env_path}/promote", {"deployment_id": d1})
    assert again.status == 409 and "in progress" in again.json()["error"]
    # Meanwhile production still answers from d1.
    assert server.ok("POST", predict_path(model_id), {})["version"] == 1
    v2.open_load()
    server.wait_for("d2 in production", lambda: (server.ok("GET", env_path)[
        "current_deployment"] or {}).get("id") == d2)
    assert server.ok("POST", predict_path(model_id), {})["version"] == 2
    env = server.ok("GET", env_path)
    assert env["previous_deployment_id"] == d1
    assert env["in_progress_promotion"]["status"] == "SUCCEEDED"
    # The demoted deployment scales to zero.
    server.wait_for("d1 scaled to zero", lambda: server.deployment(model_id, d1)[
        "status"] == "SCALED_TO_ZERO")
    assert server.deployment(model_id, d1)["is_production"] is False

    # Rollback: promote the previous deployment again; same URL, old answers.
    server.ok("POST", f"{env_path}/promote", {"deployment_id": d1})
    server.wait_for("rollback", lambda: (server.ok("GET", env_path)[
        "current_deployment"] or {}).get("id") == d1)
    assert server.ok("POST", predict_path(model_id), {})["version"] == 1
    server.wait_for("d2 scaled to zero", lambda: server.deployment(model_id, d2)[
        "status"] == "SCALED_TO_ZERO")


def test_not_found_inactive_and_deleted_give_clear_404s(server: Any, make_model: Any) -> None:
    model_id, d1 = server.push(make_model("life"), name="life")
    _, d2 = server.push(make_model("life", version=2), name="life")
    # Baseten's shortcut: promote a deployment straight to production.
    promoted = server.ok("POST", f"/v1/models/{model_id}/deployments/{d1}/promote",
                         {"scale_down_previous_production": True})
    assert promoted["id"] == d1
    server.wait_for("d1 in production", lambda: server.ok(
        "GET", f"/v1/models/{model_id}")["production_deployment_id"] == d1)

    unknown = server.call("POST", predict_path("nosuchmodel"), {})
    assert unknown.status == 404 and "nosuchmodel" in unknown.json()["error"]
    unknown = server.call("POST", predict_path(model_id, "deployment/nosuchdep"), {})
    assert unknown.status == 404 and "nosuchdep" in unknown.json()["error"]
    no_env = server.call("POST", predict_path(model_id, "environments/staging"), {})
    assert no_env.status == 404 and "staging" in no_env.json()["error"]

    # Deactivated: 404 while inactive, served again once activated.
    base = f"/v1/models/{model_id}/deployments/{d2}"
    assert server.ok("POST", f"{base}/deactivate") == {"success": True}
    inactive = server.call("POST", predict_path(model_id, f"deployment/{d2}"), {})
    assert inactive.status == 404 and "inactive" in inactive.json()["error"]
    assert server.deployment(model_id, d2)["status"] == "INACTIVE"
    server.ok("POST", f"{base}/activate")
    assert server.ok("POST", predict_path(model_id, f"deployment/{d2}"), {})["version"] == 2

    # A production deployment must be replaced before it can be deleted.
    refused = server.call("DELETE", f"/v1/models/{model_id}/deployments/{d1}")
    assert refused.status == 409 and "production" in refused.json()["error"]
    replica_url = server.deployment(model_id, d2)["replicas"][0]["url"]
    assert server.ok("DELETE", base) == {"id": d2, "deleted": True}
    gone = server.call("POST", predict_path(model_id, f"deployment/{d2}"), {})
    assert gone.status == 404 and d2 in gone.json()["error"]
    assert server.call("GET", base).status == 404
    server.wait_for("the deleted deployment's replica to stop",
                    lambda: not server.answers(replica_url))


def test_environments_settings_validation_and_host_routing(quick_server: Any,
                                                           make_model: Any) -> None:
    server = quick_server
    model_id, d1 = server.push(make_model("envs"), name="envs")
    envs = f"/v1/models/{model_id}/environments"
    assert [e["name"] for e in server.ok("GET", envs)["environments"]] == ["production"]
    dup = server.call("POST", envs, {"name": "production"})
    assert dup.status == 409
    staging = server.ok("POST", envs, {"name": "staging",
                                       "autoscaling_settings": {"max_replica": 3}})
    assert staging["autoscaling_settings"]["max_replica"] == 3
    server.ok("POST", f"{envs}/staging/promote", {"deployment_id": d1})
    server.wait_for("staging promotion", lambda: (server.ok("GET", f"{envs}/staging")[
        "current_deployment"] or {}).get("id") == d1)
    assert server.ok("POST", predict_path(model_id, "environments/staging"),
                     {"x": 1})["input"] == {"x": 1}
    # Per-model host names route like the path form.
    by_host = server.call("POST", "/environments/staging/predict", {"x": 2},
                          headers={"Host": f"model-{model_id}.api.localhost"})
    assert by_host.status == 200 and by_host.json()["input"] == {"x": 2}
    assert server.call("DELETE", f"{envs}/production").status == 409
    assert server.ok("DELETE", f"{envs}/staging") == {"name": "staging", "deleted": True}

    patch = f"/v1/models/{model_id}/deployments/{d1}/autoscaling_settings"
    bad = server.call("PATCH", patch, {"autoscaling_window": 5})
    assert bad.status == 400
    assert "autoscaling_window" in bad.json()["error"] and "10-3600 s" in bad.json()["error"]
    bad = server.call("PATCH", patch, {"target_utilization_percentage": 150})
    assert bad.status == 400 and "1-100 %" in bad.json()["error"]
    ok = server.ok("PATCH", patch, {"max_replica": 4, "concurrency_target": 2})
    assert ok["status"] == "ACCEPTED"
    assert server.ok("PATCH", patch, {"max_replica": 4})["status"] == "UNCHANGED"

    other_id, _ = server.push(make_model("doomed"), name="doomed")
    assert server.ok("DELETE", f"/v1/models/{other_id}") == {"id": other_id, "deleted": True}
    assert server.call("GET", f"/v1/models/{other_id}").status == 404
    assert server.call("POST", predict_path(other_id, "development"), {}).status == 404

    dev_model = make_model("envs", version=9)
    dev = server.ok("POST", f"/v1/models/{model_id}/deployments",
                    {"model_dir": str(dev_model.path), "development": True})
    assert dev["name"] == "development" and dev["is_development"]
    fixed = server.call(
        "PATCH", f"/v1/models/{model_id}/deployments/development/autoscaling_settings",
        {"max_replica": 3})
    assert fixed.status == 400 and "max_replica" in fixed.json()["error"]
    assert server.ok("POST", predict_path(model_id, "development"), {})["version"] == 9


def test_least_loaded_forwarding_spreads_concurrent_requests(quick_server: Any,
                                                             make_model: Any) -> None:
    server = quick_server
    model = make_model("spread", gated_predict=True)
    model_id, dep_id = server.push(model, name="spread",
                                   settings={"min_replica": 2, "max_replica": 2})
    server.wait_for("two ready replicas", lambda: server.deployment(
        model_id, dep_id)["active_replica_count"] == 2)
    with ThreadPoolExecutor(max_workers=6) as pool:
        calls = [pool.submit(server.call, "POST", predict_path(model_id, f"deployment/{dep_id}"),
                             {"i": i}) for i in range(6)]
        server.wait_for("six requests in flight", lambda: sorted(
            r["in_flight"] for r in server.deployment(model_id, dep_id)["replicas"]) == [3, 3])
        model.open_predict()
        results = [c.result() for c in calls]
    assert all(r.status == 200 for r in results)
    replicas = [r.json()["replica"] for r in results]
    assert len(set(replicas)) == 2 and replicas.count(replicas[0]) == 3


def test_queue_is_bounded_and_times_out_with_a_clear_503(tmp_path: Path, make_model: Any,
                                                         start_server: Any) -> None:
    srv = start_server(tmp_path / "state-q", "--queue-timeout-s", "3", "--max-queue", "2",
                       "--start-retry-backoff-s", "0.1", replica="standin")
    never = make_model("never", gated_load=True)
    model_id, dep_id = srv.push(never, name="never")
    path = predict_path(model_id, f"deployment/{dep_id}")
    with ThreadPoolExecutor(max_workers=2) as pool:
        waiting = [pool.submit(srv.call, "POST", path, {}) for _ in range(2)]
        srv.wait_for("two queued", lambda: srv.metric("bdn_queue_depth", dep_id) == 2)
        full = srv.call("POST", path, {})
        # Beyond --max-queue: 429 (retry later), not 503 (see test_control_router_limits).
        assert full.status == 429 and "2 requests waiting" in full.json()["error"]
        timed_out = [w.result() for w in waiting]
    for r in timed_out:
        assert r.status == 503
        assert "no replica" in r.json()["error"] and "3 s" in r.json()["error"]

    broken = make_model("broken", fail_load=True)
    model_id, dep_id = srv.push(broken, name="broken")
    failed = srv.call("POST", predict_path(model_id, f"deployment/{dep_id}"), {})
    assert failed.status == 503 and dep_id in failed.json()["error"]
    assert srv.deployment(model_id, dep_id)["last_error"]

    # A promotion whose replicas cannot start fails, and leaves production alone.
    env_path = f"/v1/models/{model_id}/environments/production"
    srv.ok("PATCH", env_path, {"autoscaling_settings": {"min_replica": 1}})
    srv.ok("POST", f"{env_path}/promote", {"deployment_id": dep_id})
    srv.wait_for("the promotion to fail", lambda: srv.ok("GET", env_path)[
        "in_progress_promotion"][
        "status"] == "FAILED")
    env = srv.ok("GET", env_path)
    assert env["current_deployment"] is None and "exited" in env["in_progress_promotion"]["error"]
    # The candidate no longer keeps the environment's replicas warm (or failing).
    assert srv.deployment(model_id, dep_id)["autoscaling_settings"]["min_replica"] == 0


def test_restart_keeps_models_deployments_environments_and_settings(
        tmp_path: Path, make_model: Any, start_server: Any) -> None:
    # The state under test is the control plane's own; stand-in replicas keep it quick.
    state = tmp_path / "state-r"
    srv = start_server(state, replica="standin")
    try:
        model_id, d1 = srv.push(make_model("durable"), name="durable")
        _, d2 = srv.push(make_model("durable", version=2), name="durable",
                         deployment_name="canary")
        srv.ok("POST", f"/v1/models/{model_id}/environments", {"name": "staging"})
        srv.ok("POST", f"/v1/models/{model_id}/environments/production/promote",
               {"deployment_id": d1})
        srv.wait_for("promotion", lambda: srv.ok("GET", f"/v1/models/{model_id}")[
            "production_deployment_id"] == d1)
        srv.ok("PATCH", f"/v1/models/{model_id}/deployments/{d2}/autoscaling_settings",
               {"max_replica": 5, "scale_down_delay": 120, "min_replica": 1})
        srv.wait_for("the prewarmed replica", lambda: srv.deployment(
            model_id, d2)["active_replica_count"] == 1)
        replica_url = srv.deployment(model_id, d2)["replicas"][0]["url"]
        before = {
            "models": srv.ok("GET", "/v1/models"),
            "deployments": [{k: d[k] for k in ("id", "name", "autoscaling_settings",
                                               "environment", "is_production")}
                            for d in srv.ok("GET", f"/v1/models/{model_id}/deployments")[
                                "deployments"]],
            "environments": [e["name"] for e in srv.ok(
                "GET", f"/v1/models/{model_id}/environments")["environments"]],
        }
    finally:
        srv.stop()
    # A graceful stop takes the replicas down with the server.
    assert not srv.answers(replica_url)

    srv = start_server(state, replica="standin")
    after = {
        "models": srv.ok("GET", "/v1/models"),
        "deployments": [{k: d[k] for k in ("id", "name", "autoscaling_settings",
                                           "environment", "is_production")}
                        for d in srv.ok("GET", f"/v1/models/{model_id}/deployments")[
                            "deployments"]],
        "environments": [e["name"] for e in srv.ok(
            "GET", f"/v1/models/{model_id}/environments")["environments"]],
    }
    assert after == before
    assert after["environments"] == ["production", "staging"]
    # min_replica 1 is honoured again after the restart.
    srv.wait_for("the prewarmed replica after restart", lambda: srv.deployment(
        model_id, d2)["active_replica_count"] == 1)
    assert srv.ok("POST", predict_path(model_id), {})["version"] == 1


def test_cli_push_promote_predict_autoscaling_environments(
        quick_server: Any, make_model: Any, monkeypatch: Any, capsys: Any) -> None:
    """The client commands, run in this process through ``bdn.cli.main`` (the watch test
    below runs the CLI as a real process)."""
    import json

    from bdn.cli import main

    server = quick_server
    monkeypatch.setenv("BDN_CONTROL_URL", server.url)
    monkeypatch.setenv("BDN_API_KEY", "test-key-0123456789")
    monkeypatch.setenv("COLUMNS", "200")

    def bdn(*args: str, code: int = 0) -> tuple[str, str]:
        capsys.readouterr()
        assert main(list(args)) == code
        out = capsys.readouterr()
        return out.out, out.err

    v1, v2 = make_model("clim", version=1), make_model("clim", version=2)
    pushed = json.loads(bdn("push", str(v1.path), "--promote")[0])
    model_id = pushed["model_id"]
    assert pushed["predict_url"].endswith(f"/models/{model_id}/production/predict")
    assert json.loads(bdn("predict", "clim", "-d", '{"q": 1}')[0])["version"] == 1
    second = json.loads(bdn("push", str(v2.path), "--name", "v2")[0])
    assert second["name"] == "v2"
    bdn("promote", "clim", "v2")
    assert json.loads(bdn("predict", "clim")[0])["version"] == 2
    bdn("promote", "clim", "--rollback")
    assert server.ok("GET", f"/v1/models/{model_id}")["production_deployment_id"] == \
        pushed["deployment_id"]
    out = json.loads(bdn("autoscaling", "set", "clim", "--max-replica", "3")[0])
    assert out["status"] == "ACCEPTED" and out["autoscaling_settings"]["max_replica"] == 3
    _, err = bdn("autoscaling", "set", "clim", "--scale-down-delay", "4000", code=1)
    assert "scale_down_delay" in err and "0-3600" in err
    bdn("environments", "clim", "--create", "staging")
    listing = bdn("environments", "clim")[0]
    assert "production" in listing and "staging" in listing
    table = bdn("deployments", "clim")[0]
    assert "deployment-1" in table and "v2" in table and "production" in table
    monkeypatch.setenv("BDN_API_KEY", "")
    _, err = bdn("deployments", "--api-key", "wrong-key-123", code=1)
    assert "401" in err and "wrong-key-123" not in err


def test_push_watch_reloads_the_development_deployment(quick_server: Any, make_model: Any) -> None:
    server = quick_server
    model = make_model("watched", version=1)
    watcher = ServiceProcess(bdn_command("push", str(model.path), "--watch"),
                             env={"BDN_CONTROL_URL": server.url,
                                  "BDN_API_KEY": "test-key-0123456789"}, ready_prefix=None)
    try:
        watcher.wait_line("watching")
        model_id = next(m["id"] for m in server.ok("GET", "/v1/models")["models"]
                        if m["name"] == "watched")
        assert server.ok("POST", predict_path(model_id, "development"), {})["version"] == 1
        source = model.path / "model" / "model.py"
        source.write_text(source.read_text().replace("VERSION = 1", "VERSION = 2"))
        watcher.wait_line("reloaded")

        def version() -> bool:
            got = server.call("POST", predict_path(model_id, "development"), {})
            return got.status == 200 and got.json()["version"] == 2
        server.wait_for("the reloaded model", version)
        assert server.deployment(model_id, "development")["is_development"]
    finally:
        watcher.stop()


def test_a_streamed_response_counts_as_in_flight_until_it_ends(quick_server: Any,
                                                               make_model: Any) -> None:
    import http.client
    import json
    from urllib.parse import urlsplit

    server = quick_server
    model = make_model("streamer")
    model_id, dep_id = server.push(model, name="streamer")
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", predict_path(model_id, f"deployment/{dep_id}"),
                     body=json.dumps({"stream": True}),
                     headers={"Authorization": "Api-Key test-key-0123456789",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline() == b"first\n"  # the first chunk arrived through the router
        # The model holds the stream open: the request is still in flight.
        assert server.metric("bdn_concurrent_requests", dep_id) == 1
        assert server.deployment(model_id, dep_id)["replicas"][0]["in_flight"] == 1
        model.open_stream()
        assert resp.read() == b"second\n"
    finally:
        conn.close()
    server.wait_for("the stream to be counted as done",
                    lambda: server.metric("bdn_concurrent_requests", dep_id) == 0)


def test_a_replica_that_dies_is_replaced(tmp_path: Path, make_model: Any,
                                         start_server: Any) -> None:
    import os
    import signal

    # No autoscaler ticks during the test (a 600 s period): the router alone must notice
    # the dead replica, and the controller replace it.
    server = start_server(tmp_path / "state-d", "--tick-interval-s", "600", replica="standin")
    model_id, dep_id = server.push(make_model("fragile"), name="fragile",
                                   settings={"min_replica": 1})
    server.wait_for("a ready replica", lambda: server.deployment(
        model_id, dep_id)["active_replica_count"] == 1)
    first = server.deployment(model_id, dep_id)["replicas"][0]
    os.kill(first["pid"], signal.SIGKILL)  # the replica we started, by its id
    server.wait_for("the replica's socket to close", lambda: not server.answers(first["url"]))
    # A refused connection takes the replica out of rotation; the request waits for the
    # replacement.
    assert server.ok("POST", predict_path(model_id, f"deployment/{dep_id}"), {})["version"] == 1

    def replaced() -> bool:
        replicas = server.deployment(model_id, dep_id)["replicas"]
        return len(replicas) == 1 and replicas[0]["pid"] != first["pid"]
    server.wait_for("a replacement replica", replaced)
    assert server.ok("POST", predict_path(model_id, f"deployment/{dep_id}"), {})["version"] == 1
    assert prom_text.value(server.metrics(), "bdn_replica_starts_total",
                           deployment_id=dep_id, outcome="ready") == 2
