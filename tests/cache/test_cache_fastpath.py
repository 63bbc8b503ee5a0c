"""The hit fast path (cache.fastpath) answers exactly as the aiohttp app does.

A fresh connection whose first request is a hit is answered by the fast path
(``Server: bdn-cache``); a connection whose first request is anything else is handed to
aiohttp and stays there. So the same request on two raw keep-alive connections compares
the two paths response by response. Also: pipelined requests across the hand-off,
many requests on one connection, and what the fast path refuses to parse.
"""

from __future__ import annotations

import os
import random
import socket

import pytest

from bdn.store import BlobStore
from cache.fastpath import parse_head
from tests.support.cache import StartCache, metrics, put_object
from tests.support.http import http_get

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

N = 1024 * 1024 + 333
FAST_SERVER = "bdn-cache"
# Differ by nature between the two paths.
UNCOMPARED = {"date", "server"}


class RawConnection:
    """One keep-alive HTTP/1.1 connection, written and read by hand."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.buf = b""
        self.status_line = ""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        more = self.sock.recv(1 << 20)
        if not more:
            raise ConnectionError("closed")
        self.buf += more

    def read_response(self, head_only: bool = False
                      ) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = 0 if head_only or status == 304 else int(headers.get("content-length", 0))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def request(self, target: str, headers: dict[str, str] | None = None,
                method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        self.send(request_bytes(target, headers, method))
        return self.read_response(head_only=method == "HEAD")


def request_bytes(target: str, headers: dict[str, str] | None = None,
                  method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: cache"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def served(store: BlobStore, start_cache: StartCache) -> tuple[str, str, bytes]:
    """(cache URL, digest, bytes) of an object already in the cache."""
    data = os.urandom(N)
    digest = str(put_object(store, data))
    cache = start_cache(store.url)
    status, _, body = http_get(f"{cache.url}/v1/objects/{digest}")
    assert status == 200 and body == data
    return cache.url, digest, data


def test_fast_path_answers_as_aiohttp_does(served: tuple[str, str, bytes]) -> None:
    url, digest, data = served
    fast, slow = RawConnection(url), RawConnection(url)
    try:
        assert slow.request("/healthz")[0] == 200  # this connection now belongs to aiohttp
        target = f"/v1/objects/{digest}"
        cases: list[tuple[str, dict[str, str]]] = [
            ("GET", {}),
            ("GET", {"Range": "bytes=0-0"}),
            ("GET", {"Range": f"bytes={N - 1}-"}),
            ("GET", {"Range": "bytes=-1000"}),
            ("GET", {"Range": "bytes=12345-"}),
            ("GET", {"Range": f"bytes=10-{N + 999}"}),
            ("GET", {"Range": "bytes=0-1,5-6"}),
            ("GET", {"Range": "items=0-1"}),
            ("GET", {"Range": f"bytes={N}-"}),      # 416
            ("GET", {"Range": "bytes=5-3"}),        # 416
            ("GET", {"Range": "bytes=a-b"}),        # 416
            ("GET", {"If-None-Match": f'"{digest}"'}),  # 304
            ("GET", {"If-None-Match": '"b3:other"', "Range": "bytes=1-2"}),
            ("GET", {"If-None-Match": f'W/"{digest}"'}),            # 304: weak match
            ("GET", {"If-None-Match": f'"x", "{digest}"'}),         # 304: in a list
            ("HEAD", {"If-None-Match": "*"}),                       # 304
            ("GET", {"Range": "bytes=0-9", "If-Range": f'"{digest}"'}),   # 206
            ("GET", {"Range": "bytes=0-9", "If-Range": '"b3:other"'}),    # 200
            ("GET", {"Range": "bytes=0-9", "If-Range": f'W/"{digest}"'}),  # 200
            ("GET", {"Range": "bytes=²-"}),                         # 416
            ("GET", {"Range": "bytes=1-" + "9" * 5000}),            # 206
            ("GET", {"Range": "bytes=" + "9" * 5000 + "-"}),        # 416
            ("HEAD", {}),
            ("HEAD", {"Range": "bytes=100-199"}),
            ("GET", {"Cache-Control": "only-if-cached"}),           # a hit: served
            ("GET", {"Cache-Control": "max-age=0, only-if-cached", "Range": "bytes=3-9"}),
        ]
        for method, headers in cases:
            a = fast.request(target, headers, method)
            b = slow.request(target, headers, method)
            assert a[1]["server"] == FAST_SERVER, (method, headers)
            assert b[1]["server"] != FAST_SERVER, (method, headers)
            assert a[0] == b[0], (method, headers)
            assert fast.status_line == slow.status_line, (method, headers)
            assert a[2] == b[2], (method, headers)
            ha = {k: v for k, v in a[1].items() if k not in UNCOMPARED}
            hb = {k: v for k, v in b[1].items() if k not in UNCOMPARED}
            if a[0] == 304:  # aiohttp leaves out a 304's length; both have no body
                ha.pop("content-length", None)
                hb.pop("content-length", None)
            assert ha == hb, (method, headers)
            if a[0] in (200, 206) and method == "GET":
                start = int(a[1].get("content-range", "bytes 0-").split(" ")[1].split("-")[0])
                assert a[2] == data[start:start + len(a[2])]
    finally:
        fast.close()
        slow.close()


def test_pipelined_requests_cross_the_hand_off(served: tuple[str, str, bytes],
                                               store: BlobStore) -> None:
    """Hits, then a request the fast path does not take, then hits again — all sent
    before any answer is read: each is answered, in order, by the right path."""
    url, digest, data = served
    other = os.urandom(5000)
    miss = str(put_object(store, other))  # in the store, not yet in the cache
    conn = RawConnection(url)
    try:
        conn.send(request_bytes(f"/v1/objects/{digest}", {"Range": "bytes=0-9"})
                  + request_bytes(f"/v1/objects/{digest}", method="HEAD")
                  + request_bytes(f"/v1/objects/{miss}")
                  + request_bytes(f"/v1/objects/{digest}", {"Range": "bytes=-5"}))
        s1, h1, b1 = conn.read_response()
        s2, h2, b2 = conn.read_response(head_only=True)
        s3, h3, b3 = conn.read_response()
        s4, h4, b4 = conn.read_response()
        assert (s1, b1, h1["server"]) == (206, data[:10], FAST_SERVER)
        assert (s2, b2, h2["server"], h2["content-length"]) == (200, b"", FAST_SERVER,
                                                                str(N))
        assert (s3, b3, h3["x-bdn-cache"]) == (200, other, "miss")
        assert h3["server"] != FAST_SERVER
        assert (s4, b4) == (206, data[-5:]) and h4["server"] != FAST_SERVER
    finally:
        conn.close()


def test_many_ranges_on_one_connection(served: tuple[str, str, bytes]) -> None:
    url, digest, data = served
    rng = random.Random(4)
    before = metrics(url)
    conn = RawConnection(url)
    try:
        total = 0
        for _ in range(200):
            start = rng.randrange(N)
            end = min(N, start + rng.randrange(1, 300_000))
            status, headers, body = conn.request(f"/v1/objects/{digest}",
                                                 {"Range": f"bytes={start}-{end - 1}"})
            assert status == 206 and headers["server"] == FAST_SERVER
            assert body == data[start:end]
            total += end - start
    finally:
        conn.close()
    after = metrics(url)
    assert after["bdn_cache_hits_total"] - before["bdn_cache_hits_total"] == 200
    assert after["bdn_cache_bytes_served_total"] - before["bdn_cache_bytes_served_total"] \
        == total


def test_client_gone_mid_body_leaves_the_server_serving(
        served: tuple[str, str, bytes]) -> None:
    url, digest, data = served
    for _ in range(3):
        conn = RawConnection(url)
        conn.send(request_bytes(f"/v1/objects/{digest}"))
        conn.sock.recv(1000)  # the head and a little of the body, then gone
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        conn.close()  # RST
    status, _, body = http_get(f"{url}/v1/objects/{digest}")
    assert status == 200 and body == data


def test_connection_close_is_honoured(served: tuple[str, str, bytes]) -> None:
    url, digest, data = served
    conn = RawConnection(url)
    try:
        status, headers, body = conn.request(f"/v1/objects/{digest}",
                                             {"Connection": "close", "Range": "bytes=0-3"})
        assert (status, body, headers["connection"]) == (206, data[:4], "close")
        assert conn.sock.recv(10) == b""  # the server closed its end
    finally:
        conn.close()


GOOD = "b3:" + "ab" * 32


@pytest.mark.parametrize("head", [
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nHost: x",
    f"HEAD /v1/objects/{GOOD} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\nIf-None-Match: \"x\"",
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
    "Content-Length: 0",
])
def test_parse_head_takes_plain_hits(head: str) -> None:
    req = parse_head(head.encode())
    assert req is not None and req.digest == GOOD and req.hex == "ab" * 32


@pytest.mark.parametrize("head", [
    f"GET /v1/objects/{GOOD} HTTP/1.0",                            # old protocol
    f"POST /v1/objects/{GOOD} HTTP/1.1",                           # not a read
    f"GET /v1/objects/{GOOD}?x=1 HTTP/1.1",                        # a query
    f"GET /v1/objects/{GOOD}/more HTTP/1.1",                       # another route
    f"GET /v1/manifests/{GOOD} HTTP/1.1",                          # a manifest
    "GET /v1/objects/b3:ABCD HTTP/1.1",                            # a bad digest
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nTransfer-Encoding: chunked",
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nContent-Length: 5",
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nRange: bytes=0-1\r\nRange: bytes=2-3",
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nRange : bytes=0-1",        # space before colon
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nX-A: 1\r\n folded",       # obsolete folding
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nX-A: a\x00b",             # a control byte
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nConnection: Upgrade",
    f"GET  /v1/objects/{GOOD} HTTP/1.1",                           # two spaces
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nRange: bytes=0-1",         # no Host
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nHost: a\r\nhost: b",       # two Hosts
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nHost: a\r\nIf-Range: \"x\"\r\nIf-Range: \"y\"",
    f"GET /v1/objects/{GOOD} HTTP/1.1\r\nHost: a" + "".join(f"\r\nX-{i}: 1"
                                                            for i in range(100)),
])
def test_parse_head_leaves_the_rest_to_aiohttp(head: str) -> None:
    assert parse_head(head.encode()) is None
