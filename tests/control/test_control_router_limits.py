"""The router's bounds: streamed bodies, in flight only once arrived, a bounded wait.

A real control server with stand-in replicas (``replica_standin.py``). Slow uploads are
raw sockets that send half a body and stop; the stand-in logs every chunk it receives
(``X-Body-Log``), so a test sees a body reach the replica while the client is still
sending it, which only a streaming router allows. The server's own gauges say when a
request waits, is in flight or is queued, so nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.serving.test_serving_limits import read_response
from tests.support import metrics as prom_text
from tests.support.control import API_KEY

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

STEADY = {"min_replica": 1, "max_replica": 3, "concurrency_target": 1,
          "target_utilization_percentage": 100}


def predict_path(model_id: str, dep_id: str) -> str:
    return f"/models/{model_id}/deployment/{dep_id}/predict"


def received(log: Path) -> int:
    """Bytes of the body the replica has received so far (0 before the first chunk)."""
    try:
        lines = log.read_text().split()
    except FileNotFoundError:
        return 0
    return int(lines[-1]) if lines else 0


class Upload:
    """A POST whose body is sent in two parts, under the test's control."""

    def __init__(self, server: Any, path: str, n: int, log: Path | None = None,
                 pad_bytes: int = 200_000) -> None:
        self.body = json.dumps({"n": n, "pad": "x" * pad_bytes}).encode()
        self.half = len(self.body) // 2
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Api-Key {API_KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(self.body)}\r\n"
                + (f"X-Body-Log: {log}\r\n" if log else "") + "\r\n").encode()
        self.sock.sendall(head + self.body[:self.half])

    def finish(self) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(self.body[self.half:])
        return self.response()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        try:
            return read_response(self.sock)
        finally:
            self.sock.close()


def test_slow_uploads_stream_wait_bounded_and_are_not_load(tmp_path: Path, make_model: Any,
                                                           start_server: Any) -> None:
    srv = start_server(tmp_path / "state", "--max-queue", "3", replica="standin")
    model_id, dep_id = srv.push(make_model("slow"), name="slow", settings=STEADY)
    srv.wait_for("a ready replica", lambda: srv.deployment(
        model_id, dep_id)["active_replica_count"] == 1)
    path = predict_path(model_id, dep_id)
    logs = [tmp_path / f"body-{i}.log" for i in range(3)]
    uploads = []
    for i in range(2):
        uploads.append(Upload(srv, path, i, logs[i]))
        # The replica has the first half while the client still holds the second: the
        # router streams the body rather than buffering it.
        srv.wait_for(f"upload {i} to reach the replica",
                     lambda i=i: received(logs[i]) >= uploads[i].half, timeout_s=30)
    # Another request is served meanwhile.
    assert srv.ok("POST", path, {"n": 99})["input"] == {"n": 99}
    uploads.append(Upload(srv, path, 2, logs[2]))
    srv.wait_for("three waiting uploads",
                 lambda: srv.metric("bdn_waiting_requests", dep_id) == 3, timeout_s=30)
    # Slow uploads are not load: nothing in flight, so no scale-up.
    assert srv.metric("bdn_concurrent_requests", dep_id) == 0
    assert srv.metric("bdn_desired_replicas", dep_id) == 1
    assert srv.deployment(model_id, dep_id)["waiting_requests"] == 3
    # The wait is bounded although a replica is ready.
    full = srv.call("POST", path, {"n": 100})
    assert full.status == 429 and "3 requests waiting" in full.json()["error"]
    assert srv.call("GET", "/health/live", key=None).status == 200
    results = [u.finish() for u in uploads]
    for i, (status, _, body) in enumerate(results):
        assert status == 200, body
        assert json.loads(body)["input"] == {"n": i, "pad": "x" * 200_000}
        assert received(logs[i]) == len(uploads[i].body)
    srv.wait_for("nothing waiting or in flight", lambda: (
        srv.metric("bdn_waiting_requests", dep_id),
        srv.metric("bdn_concurrent_requests", dep_id)) == (0, 0))
    assert prom_text.value(srv.metrics(), "bdn_requests_total", deployment_id=dep_id,
                           code="429") == 1


def test_waiting_without_a_replica_is_bounded_and_slow_uploads_do_not_wake_it(
        tmp_path: Path, make_model: Any, start_server: Any) -> None:
    srv = start_server(tmp_path / "state", "--max-queue", "2", replica="standin")
    model = make_model("cold", gated_load=True)
    model_id, dep_id = srv.push(model, name="cold")  # min_replica 0: scaled to zero
    path = predict_path(model_id, dep_id)
    slow = Upload(srv, path, 0)
    srv.wait_for("the upload to wait", lambda: srv.metric("bdn_waiting_requests", dep_id) == 1)
    # Half a body is not a request yet: it neither counts nor wakes the deployment.
    assert srv.metric("bdn_concurrent_requests", dep_id) == 0
    assert srv.metric("bdn_starting_replicas", dep_id) == 0
    assert srv.deployment(model_id, dep_id)["status"] == "SCALED_TO_ZERO"
    with ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(srv.call, "POST", path, {"n": 1})
        # A whole (small) body is load: it wakes the deployment and is held for it.
        srv.wait_for("a replica to start", lambda: srv.metric(
            "bdn_starting_replicas", dep_id) == 1)
        srv.wait_for("one queued", lambda: srv.metric("bdn_queue_depth", dep_id) == 1)
        assert srv.metric("bdn_concurrent_requests", dep_id) == 1
        full = srv.call("POST", path, {"n": 2}, headers={})
        assert full.status == 429 and "2 requests waiting" in full.json()["error"]
        status, headers, _ = Upload(srv, path, 3).response()
        assert status == 429 and headers["retry-after"] == "1"
        model.open_load()
        assert held.result().status == 200 and held.result().json()["input"] == {"n": 1}
    status, _, body = slow.finish()
    assert status == 200 and json.loads(body)["input"]["n"] == 0


def test_a_body_that_never_arrives_gets_408(tmp_path: Path, make_model: Any,
                                           start_server: Any) -> None:
    srv = start_server(tmp_path / "state", "--queue-timeout-s", "2", replica="standin")
    model_id, dep_id = srv.push(make_model("stall"), name="stall", settings=STEADY)
    srv.wait_for("a ready replica", lambda: srv.deployment(
        model_id, dep_id)["active_replica_count"] == 1)
    started = time.monotonic()
    stalled = Upload(srv, predict_path(model_id, dep_id), 0)
    # Others are served while it stalls.
    assert srv.ok("POST", predict_path(model_id, dep_id), {"n": 1})["input"] == {"n": 1}
    status, _, body = stalled.response()
    assert status == 408 and b"did not fully arrive" in body, body
    assert time.monotonic() - started < 2 + 30  # the timeout plus slack for a busy machine
    srv.wait_for("nothing waiting", lambda: srv.metric("bdn_waiting_requests", dep_id) == 0)
    assert srv.metric("bdn_concurrent_requests", dep_id) == 0


def test_a_refused_connection_is_retried_with_a_body_beyond_the_hold(
        tmp_path: Path, make_model: Any, start_server: Any) -> None:
    """Retry-before-send with a streamed body: the refused attempt sent nothing, so the
    request goes whole to the replacement, though it is larger than the router holds."""
    import os
    import signal

    # No autoscaler ticks: the router alone must notice the dead replica.
    srv = start_server(tmp_path / "state", "--tick-interval-s", "600", replica="standin")
    model_id, dep_id = srv.push(make_model("fragile"), name="fragile",
                                settings={"min_replica": 1})
    srv.wait_for("a ready replica", lambda: srv.deployment(
        model_id, dep_id)["active_replica_count"] == 1)
    first = srv.deployment(model_id, dep_id)["replicas"][0]
    os.kill(first["pid"], signal.SIGKILL)  # the replica the server started, by its id
    srv.wait_for("the replica's socket to close", lambda: not srv.answers(first["url"]))
    pad = "y" * (3 << 20)  # three times HOLD_LIMIT_BYTES
    # (X-Body-Log makes the stand-in read the body as a stream, past aiohttp's 1 MiB cap.)
    r = srv.call("POST", predict_path(model_id, dep_id), {"pad": pad},
                 headers={"X-Body-Log": str(tmp_path / "body.log")})
    assert r.status == 200, r.body[:300]
    assert r.json()["input"] == {"pad": pad} and r.json()["replica"] != first["id"]
    assert srv.deployment(model_id, dep_id)["replicas"][0]["pid"] != first["pid"]


def test_a_replica_refusing_a_streamed_body_early_is_relayed(tmp_path: Path, make_model: Any,
                                                            start_server: Any) -> None:
    """``bdn serve`` answers 413 before reading an oversized body; the router, still
    streaming it, relays that answer (not a 502) and the replica goes on serving."""
    import shlex
    import sys

    command = shlex.join([sys.executable, "-m", "bdn.cli", "serve",
                          "--max-body-bytes", "100000"])
    srv = start_server(tmp_path / "state", "--replica-command", command)
    model_id, dep_id = srv.push(make_model("small"), name="small", settings={"min_replica": 1})
    srv.wait_for("a ready replica", lambda: srv.deployment(
        model_id, dep_id)["active_replica_count"] == 1, timeout_s=120)
    path = predict_path(model_id, dep_id)
    big = srv.call("POST", path, {"pad": "z" * (4 << 20)})
    assert big.status == 413 and b"100000 bytes" in big.body, big.body[:300]
    assert srv.ok("POST", path, {"n": 1})["input"] == {"n": 1}
    srv.wait_for("nothing waiting or in flight", lambda: (
        srv.metric("bdn_waiting_requests", dep_id),
        srv.metric("bdn_concurrent_requests", dep_id)) == (0, 0))
