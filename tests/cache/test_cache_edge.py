"""The cache's HTTP edge, bounded: every validator anchored to the whole string,
conditional requests, negative caching, bounded prefetch bodies, rate-limited verify,
and connection timeouts (a soak of half-open connections beside normal clients).

Every behaviour is checked against a running ``bdn cache-server`` process over raw
loopback sockets; the pure parts (validators, the negative cache policy) directly.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bdn.config import parse_auth
from bdn.errors import ConfigError
from bdn.store import BlobStore
from cache.cli import parse_bytes
from cache.edge import ACCEPT_BACKOFF_S, VERIFY_INTERVAL_S, NegativeCache, PerKeyRateLimit
from control.errors import RequestError
from control.store import check_name
from manifests.digest import Digest
from manifests.errors import DigestError, RefError
from manifests.refs import Ref
from tests.cache.test_cache_fastpath import RawConnection
from tests.support.cache import StartCache, metrics, put_object
from tests.support.http import http_get, post_json, recv_until
from tests.support.procs import ServiceProcess

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

# -- item 7: validators match the whole string ----------------------------------------

HEX = "ab" * 32


def test_digest_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(DigestError):
        Digest.parse(f"b3:{HEX}\n")


@pytest.mark.parametrize("part", ["namespace", "model", "tag"])
def test_ref_part_with_a_trailing_newline_is_refused(part: str) -> None:
    parts = {"namespace": "ns", "model": "m", "tag": "t"}
    parts[part] += "\n"
    with pytest.raises(RefError):
        Ref(**parts)


def test_control_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(RequestError):
        check_name("model\n", "name")


def test_secret_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError):
        parse_auth({"auth_secret_name": "hf-token\n"}, 0)


def test_byte_size_with_a_trailing_newline_still_parses_as_spaces_do() -> None:
    # \s* around the number already allowed whitespace: unchanged, now explicit.
    assert parse_bytes("10M\n") == parse_bytes(" 10M ") == 10 << 20


def test_trailing_newline_is_400_at_the_cache_and_writes_no_ref(
        store: BlobStore, start_cache: StartCache) -> None:
    cache = start_cache(store.url)
    conn = RawConnection(cache.url)
    try:
        for target in (f"/v1/objects/b3:{HEX}%0A", f"/v1/manifests/b3:{HEX}%0A",
                       "/v1/refs/ns/model/tag%0A", "/v1/refs/ns%0A/model/tag"):
            assert conn.request(target)[0] == 400, target
        status, body = post_json(f"{cache.url}/v1/prefetch", {"ref": "ns/model:tag\n"})
        assert status == 400, body
        status, body = post_json(f"{cache.url}/v1/objects/b3:{HEX}%0A/verify")
        assert status == 400, body
    finally:
        conn.close()
    refs = os.path.join(store.url.removeprefix("file://"), "refs")
    assert not os.path.exists(refs) or not any(
        "\n" in name for _, dirs, files in os.walk(refs) for name in dirs + files)


# -- helpers -----------------------------------------------------------------------------


def _address(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host, int(port)


def _status_line(url: str, pieces: list[bytes], *, via_aiohttp: bool) -> bytes:
    """The status line the cache answers ``pieces`` (one request, sent piece by piece)
    with, on a fresh connection: first on the fast path, or (``via_aiohttp``) on one
    aiohttp already owns."""
    sock = socket.create_connection(_address(url), timeout=30)
    try:
        got = b""
        if via_aiohttp:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            conn = RawConnection.__new__(RawConnection)
            conn.sock, conn.buf = sock, b""
            assert conn.read_response()[0] == 200
            got = conn.buf
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)
        return recv_until(sock, b"\r\n", got).partition(b"\r\n")[0]
    finally:
        sock.close()


def _head(target: str, *fields: str, line_end: bytes = b"\r\n") -> bytes:
    lines = [f"GET {target} HTTP/1.1", *fields]
    return line_end.join(x.encode("utf-8") for x in lines) + line_end + line_end


@pytest.fixture(params=[1, 2], ids=["owner", "workers"])
def cached(request: pytest.FixtureRequest, store: BlobStore,
           start_cache: StartCache) -> tuple[str, str, bytes]:
    """(cache URL, digest, bytes) of an object already in the cache, served by one
    process or by the owner and a hit worker."""
    data = os.urandom(10_000)
    digest = str(put_object(store, data))
    cache = start_cache(store.url, workers=request.param)
    status, _, body = http_get(f"{cache.url}/v1/objects/{digest}")
    assert status == 200 and body == data
    return cache.url, digest, data


# -- items 6 and 8: both paths answer hostile and conditional requests alike -------------


def _cases(digest: str) -> dict[str, list[bytes]]:
    t = f"/v1/objects/{digest}"
    etag = f'"{digest}"'
    many = [f"X-{i}: {i}" for i in range(100)]
    wide = [f"X-{i}: {'a' * 1000}" for i in range(9)]
    trickled = _head(t, "Host: x", *wide)
    return {
        "no Host": [_head(t)],
        "two Hosts": [_head(t, "Host: a", "Host: b")],
        "100 fields": [_head(t, "Host: x", *many[:99])],
        "101 fields": [_head(t, "Host: x", *many)],
        "a 9000-byte field": [_head(t, "Host: x", "X-Big: " + "a" * 9000)],
        "a 9 KiB head": [_head(t, "Host: x", *wide)],
        "a 9 KiB head, trickled": [trickled[i:i + 100] for i in range(0, len(trickled), 100)],
        "bare LF": [_head(t, "Host: x", line_end=b"\n")],
        "bare LF inside": [f"GET {t} HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n".encode()],
        "Range ²": [_head(t, "Host: x", "Range: bytes=²-")],
        "Range ٣": [_head(t, "Host: x", "Range: bytes=٣-٤")],
        "Range long start": [_head(t, "Host: x", "Range: bytes=" + "9" * 5000 + "-")],
        "Range long end": [_head(t, "Host: x", "Range: bytes=1-" + "9" * 5000)],
        "Range long suffix": [_head(t, "Host: x", "Range: bytes=-" + "9" * 5000)],
        "Range zeros": [_head(t, "Host: x", "Range: bytes=" + "0" * 40 + "1-2")],
        "INM strong": [_head(t, "Host: x", f"If-None-Match: {etag}")],
        "INM weak": [_head(t, "Host: x", f"If-None-Match: W/{etag}")],
        "INM list": [_head(t, "Host: x", f'If-None-Match: "a", W/"b", {etag}')],
        "INM star": [_head(t, "Host: x", "If-None-Match: *")],
        "INM other": [_head(t, "Host: x", 'If-None-Match: "b3:other", W/"x"')],
        "If-Range same": [_head(t, "Host: x", "Range: bytes=0-9", f"If-Range: {etag}")],
        "If-Range weak": [_head(t, "Host: x", "Range: bytes=0-9", f"If-Range: W/{etag}")],
        "If-Range other": [_head(t, "Host: x", "Range: bytes=0-9", 'If-Range: "b3:x"')],
        "If-Range date": [_head(t, "Host: x", "Range: bytes=0-9",
                                "If-Range: Wed, 21 Oct 2015 07:28:00 GMT")],
    }


EXPECTED = {
    "no Host": 400, "two Hosts": 400, "100 fields": 200, "101 fields": 400,
    "a 9000-byte field": 400, "a 9 KiB head": 431, "a 9 KiB head, trickled": 431,
    "bare LF": 400, "bare LF inside": 400, "Range ²": 416, "Range ٣": 416,
    "Range long start": 416, "Range long end": 206, "Range long suffix": 206,
    "Range zeros": 206, "INM strong": 304, "INM weak": 304, "INM list": 304,
    "INM star": 304, "INM other": 200, "If-Range same": 206, "If-Range weak": 200,
    "If-Range other": 200, "If-Range date": 200,
}


def test_both_paths_answer_hostile_and_conditional_requests_alike(
        cached: tuple[str, str, bytes]) -> None:
    url, digest, _ = cached
    for name, pieces in _cases(digest).items():
        fast = _status_line(url, pieces, via_aiohttp=False)
        slow = _status_line(url, pieces, via_aiohttp=True)
        assert fast == slow, (name, fast, slow)
        assert int(fast.split(b" ")[1]) == EXPECTED[name], (name, fast)


def test_conditional_requests_on_misses(store: BlobStore, start_cache: StartCache) -> None:
    """A miss is filled, then answered as a hit would be: 304 for a matching
    If-None-Match, the whole object for an If-Range that does not match."""
    cache = start_cache(store.url)
    for inm in ('"{d}"', 'W/"{d}"', '"other", "{d}"', "*"):
        data = os.urandom(5000)
        digest = str(put_object(store, data))
        status, headers, body = http_get(f"{cache.url}/v1/objects/{digest}",
                                         {"If-None-Match": inm.format(d=digest)})
        assert (status, body, headers["ETag"]) == (304, b"", f'"{digest}"'), inm
        status, headers, body = http_get(f"{cache.url}/v1/objects/{digest}")
        # The 304 may be answered before its fill commits: then this request joins that
        # same fill ("coalesced") instead of finding it done — one store read either way.
        assert (status, body) == (200, data), inm
        assert headers["X-Bdn-Cache"] in ("hit", "coalesced"), inm
    data = os.urandom(5000)
    digest = str(put_object(store, data))
    status, _, body = http_get(f"{cache.url}/v1/objects/{digest}",
                               {"Range": "bytes=0-9", "If-Range": '"b3:other"'})
    assert (status, body) == (200, data)
    unknown = "b3:" + "cd" * 32
    assert http_get(f"{cache.url}/v1/objects/{unknown}", {"If-None-Match": "*"})[0] == 404


# -- item 9: unauthenticated routes stay cheap --------------------------------------------


def test_negative_cache_policy() -> None:
    neg = NegativeCache(ttl_s=2.0, max_entries=2)
    assert not neg.absent("a", now=0.0)
    neg.add("a", now=10.0)
    assert neg.absent("a", now=11.9) and not neg.absent("a", now=12.0)
    assert len(neg) == 0  # expired entries are dropped when asked
    for key in ("a", "b", "c"):
        neg.add(key, now=20.0)
    assert len(neg) == 2 and not neg.absent("a", now=20.0)  # the oldest went first
    neg.discard("b")
    assert not neg.absent("b", now=20.0) and neg.absent("c", now=20.0)


def test_per_key_rate_limit_policy() -> None:
    limit = PerKeyRateLimit(interval_s=10.0, max_entries=2)
    assert limit.retry_after_s("a", now=100.0) == 0
    assert limit.retry_after_s("a", now=104.0) == pytest.approx(6.0)
    assert limit.retry_after_s("b", now=104.0) == 0
    assert limit.retry_after_s("a", now=110.0) == 0
    for key in ("c", "d"):
        assert limit.retry_after_s(key, now=111.0) == 0
    assert limit.retry_after_s("a", now=111.0) == 0  # forgotten: at most 2 keys held


def test_unknown_digests_are_remembered_briefly(store: BlobStore,
                                                start_cache: StartCache) -> None:
    cache = start_cache(store.url)
    unknown = "b3:" + "ef" * 32
    for _ in range(5):
        status, _, body = http_get(f"{cache.url}/v1/objects/{unknown}")
        assert status == 404 and unknown.encode() in body
    m = metrics(cache.url)
    assert m['bdn_cache_fill_failures_total{reason="not_found"}'] == 1
    assert m["bdn_cache_misses_total"] == 1


def test_prefetch_validates_its_body(store: BlobStore, start_cache: StartCache) -> None:
    cache = start_cache(store.url)
    manifest = "b3:" + "12" * 32  # not in the store: a valid body gets 404
    me = "http://10.0.0.1:8401"
    too_many = [f"http://10.0.{i // 250}.{i % 250}:8401" for i in range(2000)] + [me]
    for peers, self_ in (({me: 1}, me), ("abc" + me, "a"), ([None], "None"),
                         ([me, 5], me), (too_many, me), ([me, "ftp://x"], me),
                         ([me], 7), ([me + "\r\nX: 1"], me)):
        status, body = post_json(f"{cache.url}/v1/prefetch",
                                 {"manifest": manifest, "peers": peers, "self": self_})
        assert status == 400 and "bad prefetch request" in str(body["error"]), peers
    status, _ = post_json(f"{cache.url}/v1/prefetch",
                          {"manifest": manifest, "peers": [me + "/"], "self": me})
    assert status == 404


def test_verify_is_rate_limited_per_object(store: BlobStore,
                                           start_cache: StartCache) -> None:
    cache = start_cache(store.url)
    a, b = (str(put_object(store, os.urandom(1000))) for _ in range(2))
    for d in (a, b):
        assert http_get(f"{cache.url}/v1/objects/{d}")[0] == 200
    assert post_json(f"{cache.url}/v1/objects/{a}/verify")[1]["status"] == "ok"
    req = urllib.request.Request(f"{cache.url}/v1/objects/{a}/verify", data=b"",
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 429
    assert 1 <= int(info.value.headers["Retry-After"]) <= VERIFY_INTERVAL_S
    assert post_json(f"{cache.url}/v1/objects/{b}/verify")[1]["status"] == "ok"


# -- item 5: timeouts and descriptor exhaustion ----------------------------------------

SOAK_TIMEOUT_S = 1.0
# Generous: the machine is shared, and the bound is "closed by a timeout", not its speed.
CLOSE_SLACK_S = 20.0


def _wait_closed(socks: list[socket.socket], deadline: float) -> list[socket.socket]:
    """Wait (select, no sleeps) until the server closed each socket or ``deadline``
    (monotonic) passed; the sockets still open."""
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        left = len(socks)
        while left and time.monotonic() < deadline:
            for key, _ in sel.select(deadline - time.monotonic()):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except ConnectionError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    left -= 1
        return [key.fileobj for key in sel.get_map().values()]  # type: ignore[misc]


def test_soak_half_open_connections_beside_normal_clients(
        store: BlobStore, start_cache: StartCache) -> None:
    """300 half-open connections (silent; an unfinished head; idle after a request
    aiohttp answered; an unfinished head after that) and 100 normal clients: every
    normal request is answered, every half-open connection closed within the timeouts."""
    data = os.urandom(50_000)
    digest = str(put_object(store, data))
    cache = start_cache(store.url, idle_timeout=SOAK_TIMEOUT_S,
                        header_timeout=SOAK_TIMEOUT_S, body_timeout=SOAK_TIMEOUT_S)
    assert http_get(f"{cache.url}/v1/objects/{digest}")[0] == 200
    addr = _address(cache.url)
    half_open: list[socket.socket] = []
    try:
        started = time.monotonic()
        for i in range(300):
            s = socket.create_connection(addr, timeout=30)
            half_open.append(s)
            kind = i % 4
            if kind in (2, 3):  # aiohttp owns it from its first request
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                got = b""
                while b'"ok"' not in got:
                    got += s.recv(65536)
            if kind in (1, 3):
                s.sendall(f"GET /v1/objects/{digest} HTTP/1.1\r\nHost: x\r\nX-".encode())

        def client(_: int) -> tuple[int, bytes]:
            status, _, body = http_get(f"{cache.url}/v1/objects/{digest}")
            return status, body

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(client, range(100)))
        assert answers == [(200, data)] * 100
        # aiohttp's one timer covers idle and head time: their sum, from its request.
        bound = started + 2 * SOAK_TIMEOUT_S + CLOSE_SLACK_S
        left = _wait_closed(half_open, bound)
        assert not left, f"{len(left)} of 300 half-open connections still open"
        assert time.monotonic() - started >= SOAK_TIMEOUT_S  # closed by the timeout
        assert http_get(f"{cache.url}/v1/objects/{digest}")[0] == 200
    finally:
        for s in half_open:
            s.close()


def test_a_request_body_that_stops_gets_408(store: BlobStore,
                                            start_cache: StartCache) -> None:
    cache = start_cache(store.url, body_timeout=SOAK_TIMEOUT_S)
    s = socket.create_connection(_address(cache.url), timeout=30)
    try:
        s.sendall(b"POST /v1/prefetch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 100\r\n\r\n{\"manifest\": ")
        started = time.monotonic()
        got = recv_until(s, b"\r\n")
        assert got.startswith(b"HTTP/1.1 408 "), got[:100]
        assert time.monotonic() - started < SOAK_TIMEOUT_S + CLOSE_SLACK_S
    finally:
        s.close()


FD_LIMIT = 96
_LIMITED = ("import resource, runpy, sys; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, ({n}, {n})); "
            "sys.argv[0] = 'bdn'; runpy.run_module('bdn.cli', run_name='__main__')")
REFUSAL_LINES = ("cache port:", "out of system resource")


def test_descriptor_exhaustion_backs_off_accept_and_keeps_answering(
        store: BlobStore, procs: list[ServiceProcess], tmp_path: Path) -> None:
    """With RLIMIT_NOFILE lowered in the server process, a flood of connections never
    takes the descriptors its existing clients need: they are answered throughout,
    accepting pauses, and the pause is logged once per interval, not per connection."""
    data = os.urandom(20_000)
    digest = str(put_object(store, data))
    cache = ServiceProcess([
        sys.executable, "-c", _LIMITED.format(n=FD_LIMIT), "cache-server", "--store",
        store.url, "--dir", str(tmp_path / "cache"), "--budget-bytes", str(1 << 30),
        "--listen", "127.0.0.1:0"])
    procs.append(cache)
    assert cache.url is not None
    target = f"/v1/objects/{digest}"
    fast, slow = RawConnection(cache.url), RawConnection(cache.url)
    flood: list[socket.socket] = []
    try:
        assert fast.request(target)[2] == data  # fills it; the fast path keeps it
        assert slow.request("/healthz")[0] == 200  # aiohttp owns this one
        started = time.monotonic()
        for _ in range(300):
            flood.append(socket.create_connection(_address(cache.url), timeout=30))
        cache.wait_line("cache port:")  # the server stopped accepting, and said so
        for i in range(20):
            status, _, body = fast.request(target, {"Range": f"bytes={i}-{i + 99}"})
            assert (status, body) == (206, data[i:i + 100])
            status, _, body = slow.request(target)
            assert (status, body) == (200, data)
        for s in flood:
            s.close()
        flood.clear()
        # Accepting resumes once the flood is gone: a new client is answered.
        assert http_get(f"{cache.url}{target}")[2] == data
        elapsed = time.monotonic() - started
        refusals = [x for x in cache.lines if any(n in x for n in REFUSAL_LINES)]
        assert len(refusals) <= elapsed / ACCEPT_BACKOFF_S + 2, refusals[:5]
    finally:
        fast.close()
        slow.close()
        for s in flood:
            s.close()
