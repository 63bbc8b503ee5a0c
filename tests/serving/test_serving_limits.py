"""``bdn serve`` bounds the work of every request, and serves others meanwhile.

Each test runs a real server process on loopback with a tiny model folder (no weights),
sends the hostile request over a raw socket where the test must control the bytes on
the wire (a body that stalls halfway, a ``Content-Length`` that lies), and checks that
``/health/ready`` and ordinary predictions are answered while that request is held.
Requests are held by a gate file the model's ``predict()`` waits for, and the server's
own ``/metrics`` say when they are queued, so nothing here sleeps to synchronise.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest

from tests.serving.test_serving_server import http, make_model, predict
from tests.support.procs import ServiceProcess, bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GATED_PREDICT = """
import os, time

GATE = {gate!r}

class Model:
    def __init__(self, **kwargs):
        pass

    def predict(self, model_input):
        if isinstance(model_input, dict) and model_input.get("wait"):
            while not os.path.exists(GATE):
                time.sleep(0.005)
        if isinstance(model_input, dict) and "n" in model_input:
            return {{"n": model_input["n"]}}
        return {{"size": len(model_input) if isinstance(model_input, (list, str)) else 0}}
"""
POLL_S = 0.02


def metric(url: str, name: str) -> float:
    for line in http("GET", f"{url}/metrics")[1].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Path]]]:
    """Start ``bdn serve`` on the gated model with extra flags; all stopped at teardown."""
    started: list[ServiceProcess] = []
    counter = iter(range(100))

    def start(*flags: str, predict_concurrency: int = 1) -> tuple[str, Path]:
        n = next(counter)
        gate = tmp_path / f"gate-{n}"
        model = make_model(tmp_path / f"m{n}", GATED_PREDICT.format(gate=str(gate)),
                           {"runtime": {"predict_concurrency": predict_concurrency}})
        proc = ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0",
                                          *flags))
        started.append(proc)
        proc.wait_line("BDN_READY")
        assert proc.url is not None
        return proc.url, gate

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def raw_request(url: str, head_extra: str, body: bytes = b"",
                ctype: str = "application/json") -> socket.socket:
    """Open a connection and send a POST /predict head (and ``body``), nothing more."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
            f"{head_extra}\r\n").encode()
    sock.sendall(head + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]


def serves_others(url: str) -> None:
    """The server answers its probes and an ordinary prediction right now."""
    assert http("GET", f"{url}/health/ready")[0] == 200
    assert http("GET", f"{url}/health/live")[0] == 200
    assert predict(url, {"n": 7}) == (200, {"n": 7})


def test_body_over_the_limit_is_413_before_it_is_read(serve: Callable) -> None:
    url, _ = serve("--max-body-bytes", "1000")
    # Content-Length says too much: refused from the header, the body never sent.
    with raw_request(url, "Content-Length: 1001\r\n") as sock:
        status, _, body = read_response(sock)
    assert status == 413 and b"1000 bytes" in body
    # A chunked body is refused as soon as it passes the limit.
    with raw_request(url, "Transfer-Encoding: chunked\r\n",
                     b"%x\r\n%s\r\n" % (600, b" " * 600) * 2) as sock:
        status, _, body = read_response(sock)
    assert status == 413 and b"larger than" in body
    # At the limit exactly is fine.
    payload = json.dumps("x" * 998).encode()
    assert len(payload) == 1000
    code, raw, _ = http("POST", f"{url}/predict", payload)
    assert code == 200 and json.loads(raw) == {"size": 998}
    serves_others(url)


def test_default_body_limit_is_64_mib(serve: Callable) -> None:
    url, _ = serve()
    with raw_request(url, f"Content-Length: {64 * (1 << 20) + 1}\r\n") as sock:
        status, _, body = read_response(sock)
    assert status == 413 and str(64 * (1 << 20)).encode() in body
    serves_others(url)


def test_slow_body_times_out_with_408_and_others_are_served(serve: Callable) -> None:
    url, _ = serve("--body-timeout-s", "2")
    started = time.monotonic()
    with raw_request(url, "Content-Length: 1000\r\n", b'{"a": "') as sock:
        serves_others(url)  # while that body stalls
        status, _, body = read_response(sock)
    took = time.monotonic() - started
    assert status == 408 and b"did not arrive within 2 s" in body
    assert took < 2 + 30  # the timeout plus generous slack for a loaded machine
    serves_others(url)


@pytest.mark.parametrize("payload, ctype, needle", [
    (b"[" * 100_000 + b"]" * 100_000, "application/json", b"nested too deeply"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "application/json", b"nested too deeply"),
    (b"\x91" * 5000 + b"\xc0", "application/octet-stream", b"nested too deeply"),
    (b"\xff\xfe{]", "application/json", b"not valid JSON"),
    (b"\xc1", "application/octet-stream", b"not valid msgpack"),
    (msgpack.packb([1, 2]) + b"\x01", "application/octet-stream", b"not valid msgpack"),
])
def test_hostile_input_is_a_400_with_a_message(serve: Callable, payload: bytes, ctype: str,
                                               needle: bytes) -> None:
    url, _ = serve()
    code, raw, _ = http("POST", f"{url}/predict", payload, ctype=ctype)
    assert code == 400, raw
    assert needle in raw and "error" in json.loads(raw)
    serves_others(url)


def test_queue_beyond_max_queue_is_429_with_retry_after(serve: Callable) -> None:
    url, gate = serve("--max-queue", "2", predict_concurrency=1)
    assert metric(url, "bdn_max_queue") == 2
    with ThreadPoolExecutor(max_workers=3) as pool:
        running = pool.submit(predict, url, {"wait": True, "n": 0})
        wait_for("one request in the model", lambda: metric(url, "bdn_requests_active") == 1)
        queued = [pool.submit(predict, url, {"wait": True, "n": i}) for i in (1, 2)]
        wait_for("two queued", lambda: metric(url, "bdn_requests_waiting") == 2)
        with raw_request(url, "Content-Length: 2\r\n", b"{}") as sock:
            status, headers, body = read_response(sock)
        assert status == 429 and headers["retry-after"] == "1"
        assert "queue is full (2 requests waiting)" in json.loads(body)["error"]
        # Probes still answer while the queue is full.
        assert http("GET", f"{url}/health/ready")[0] == 200
        gate.touch()
        assert [f.result(60) for f in (running, *queued)] == [(200, {"n": i})
                                                               for i in range(3)]
    metrics = http("GET", f"{url}/metrics")[1].decode()
    assert 'bdn_requests_total{code="429"} 1' in metrics
    serves_others(url)


def test_default_queue_is_16_per_predict_slot(serve: Callable) -> None:
    url, _ = serve(predict_concurrency=3)
    assert metric(url, "bdn_max_queue") == 48


def test_a_huge_allowed_body_does_not_stall_the_server(serve: Callable) -> None:
    """A ~40 MiB body, half sent and stalled: probes and other predictions are answered,
    then the rest arrives and it is parsed (off the loop) and predicted."""
    url, _ = serve(predict_concurrency=2)
    payload = json.dumps(["x" * 30] * 1_200_000).encode()
    assert 32 << 20 < len(payload) < 64 << 20
    half = len(payload) // 2
    with raw_request(url, f"Content-Length: {len(payload)}\r\n", payload[:half]) as sock:
        wait_for("the body to be reading", lambda: metric(url, "bdn_requests_waiting") == 1)
        serves_others(url)
        done: Future[tuple[int, dict[str, str], bytes]] = Future()

        def finish() -> None:
            sock.sendall(payload[half:])
            done.set_result(read_response(sock))
        threading.Thread(target=finish, daemon=True).start()
        # Probe while the rest of the body is sent and parsed.
        assert http("GET", f"{url}/health/ready")[0] == 200
        status, _, body = done.result(60)
    assert status == 200 and json.loads(body) == {"size": 1_200_000}
    serves_others(url)


def test_limits_are_validated_with_the_option_named(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", GATED_PREDICT.format(gate=""), {})
    for flag, value, name in (("--max-body-bytes", "0", "max_body_bytes"),
                              ("--max-queue", "-1", "max_queue"),
                              ("--body-timeout-s", "0", "body_timeout_s")):
        proc = ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0",
                                          flag, value), ready_prefix=None)
        assert proc.proc.wait(60) != 0
        proc.stop()
        assert name in proc.output and "BDN_LISTENING" not in proc.output
