"""Fixtures for the cluster cache tests: a blob store folder, real cache-server and
HTTP-store processes on free loopback ports (stopped by PID at teardown)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bdn.store import BlobStore
from cache.server import parse_metrics
from manifests.digest import Digest
from tests.support.procs import ServiceProcess, bdn_command

# http_get's status for a transfer that broke off (never a clean end).
BROKEN = -1
STORE_HTTP = str(Path(__file__).with_name("store_http.py"))
SLOW_READER_BUFFER_BYTES = 64 * 1024


def put_object(store: BlobStore, data: bytes) -> Digest:
    d = Digest.of(data)
    store.put_chunk(d, data)
    return d


def http_get(url: str, headers: dict[str, str] | None = None,
             method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except (http.client.IncompleteRead, ConnectionError):
        return BROKEN, {}, b""


def slow_reader(url: str, path: str, read_bytes: int = 0
                ) -> tuple[socket.socket, bytearray]:
    """A client that asks for ``path`` with a small receive buffer, reads the head and
    at least ``read_bytes`` bytes, then stops reading: the server stays mid-send. The
    socket, and what it read so far (head included)."""
    u = urllib.parse.urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_READER_BUFFER_BYTES)
    sock.connect((u.hostname, u.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = bytearray()
    while b"\r\n\r\n" not in got or len(got) < read_bytes:
        got += sock.recv(SLOW_READER_BUFFER_BYTES)
    return sock, got


def metrics(url: str) -> dict[str, float]:
    return parse_metrics(http_get(f"{url}/metrics")[2].decode())


def post_json(url: str, body: object | None = None) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(str(tmp_path / "store"))


@pytest.fixture
def procs() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for p in started:
        p.stop()


StartCache = Callable[..., ServiceProcess]


@pytest.fixture
def start_cache(procs: list[ServiceProcess], tmp_path: Path) -> StartCache:
    """Start ``bdn cache-server``; keyword args become ``--options``."""

    def start(store_url: str, cache_dir: str | Path | None = None,
              budget: int = 1 << 30, **opts: object) -> ServiceProcess:
        cache_dir = cache_dir or tmp_path / f"cache{len(procs)}"
        args = ["cache-server", "--store", store_url, "--dir", str(cache_dir),
                "--budget-bytes", str(budget), "--listen", "127.0.0.1:0"]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        p = ServiceProcess(bdn_command(*args))
        procs.append(p)
        return p

    return start


@pytest.fixture
def start_store_http(procs: list[ServiceProcess]) -> Callable[..., ServiceProcess]:
    """Serve a store folder over HTTP (see store_http.py)."""

    def start(root: str | Path, stall_after: int | None = None,
              gated: bool = False, rate: int | None = None) -> ServiceProcess:
        cmd = [sys.executable, STORE_HTTP, str(root), "--listen", "127.0.0.1:0"]
        if stall_after is not None:
            cmd += ["--stall-after", str(stall_after)]
        if rate is not None:
            cmd += ["--rate", str(rate)]
        if gated:
            cmd.append("--gated")
        p = ServiceProcess(cmd, env={"PYTHONPATH": os.getcwd()})
        procs.append(p)
        return p

    return start
