"""Plain HTTP calls for tests: urllib with the status and body returned, never raised,
a deliberately slow reader that leaves a server mid-send, and a raw socket read up to a
marker."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request

# http_get's status for a transfer that broke off (never a clean end).
BROKEN = -1
SLOW_READER_BUFFER_BYTES = 64 * 1024


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


def recv_until(sock: socket.socket, marker: bytes, got: bytes = b"") -> bytes:
    """Bytes from ``sock`` (after ``got``, already read) until ``marker`` is among them
    or the peer closes: a request's head (``b"\\r\\n\\r\\n"``), a status line
    (``b"\\r\\n"``)."""
    while marker not in got:
        more = sock.recv(65536)
        if not more:
            break
        got += more
    return got


def post_json(url: str, body: object | None = None) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
