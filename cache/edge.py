"""The cache's HTTP edge, bounded: connection timeouts, head limits, accepting under a
file-descriptor budget, and the cheap guards of unauthenticated routes.

Why here, in one place: the cache's port is served by two HTTP implementations — the
hit fast path (:mod:`cache.fastpath`) and aiohttp behind it — in the owner and in every
hit worker. Whatever bounds a connection must hold on both, with the same numbers and
the same answers, or a client could pick the laxer path. So the limits are constants
and options here, and each path takes them from here:

- Timeouts (:class:`EdgeOptions`): a connection that sends no request is closed after
  ``idle_timeout_s``; a request head must be complete within ``header_timeout_s`` of
  its first byte; a request body must arrive within ``body_timeout_s``. The fast path
  enforces them with one sweep per process (:class:`cache.fastpath.FastPath`), aiohttp
  with its keep-alive timer (which also runs from the start of a connection and while a
  head is incomplete: on connections aiohttp serves, idle and head time share one
  timer of their sum) and with handlers that read bodies under ``body_timeout_s``.
- Heads: at most ``MAX_HEADERS`` fields and ``MAX_HEAD_BYTES`` bytes. The fast path
  hands anything larger to aiohttp, whose parser bounds each line and the field count
  and whose :func:`head_limit_middleware` refuses a head above ``MAX_HEAD_BYTES`` in all
  (431): one answer whichever path a request arrives on.
- Accepting: every connection costs descriptors (the socket, the fast path's ``dup``, an
  open object file while it is sent). :func:`max_connections` sizes a cap from
  ``RLIMIT_NOFILE`` that leaves ``RESERVED_FDS`` spare, so existing clients are still
  answered when new ones are refused; at the cap, or on ``EMFILE``, the fast path stops
  accepting for ``ACCEPT_BACKOFF_S`` and logs one line per interval (asyncio's own
  accept loop logs once per failed ``accept()``, hundreds a second).
- Unauthenticated routes stay cheap: :class:`NegativeCache` remembers digests the store
  does not have, :class:`PerKeyRateLimit` bounds ``/verify`` per object; both are pure
  policies of their inputs and an explicit ``now``.
"""

from __future__ import annotations

import logging
import math
import resource
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger(__name__)

# nginx's defaults are of this order (keepalive_timeout 75 s, client_header_timeout and
# client_body_timeout 60 s); a cache's clients are machines, so a little shorter.
DEFAULT_IDLE_TIMEOUT_S = 75.0
DEFAULT_HEADER_TIMEOUT_S = 30.0
DEFAULT_BODY_TIMEOUT_S = 30.0
# A request head: at most this many fields and bytes (aiohttp's line limit is 8190).
MAX_HEAD_BYTES = 8192
MAX_HEADERS = 100
# Descriptors left free for existing clients' object files, the index and logs.
RESERVED_FDS = 32
# A connection's socket, the fast path's dup of it, and an object file being sent.
FDS_PER_CONNECTION = 3
# How long accepting pauses at the cap or on EMFILE, and the least time between two
# log lines about it.
ACCEPT_BACKOFF_S = 1.0
# Remembered misses of digests the store does not have.
NEGATIVE_TTL_S = 2.0
MAX_NEGATIVE_ENTRIES = 10_000
# /verify re-hashes a whole object: at most once per object per this interval.
VERIFY_INTERVAL_S = 10.0
MAX_VERIFY_ENTRIES = 10_000
# A prefetch body names at most this many peers (a ring is a few dozen pods).
MAX_PREFETCH_PEERS = 1024
MAX_PEER_URL_CHARS = 2048


@dataclass(frozen=True)
class EdgeOptions:
    """Connection timeouts of the cache's port, in seconds (see the module docstring)."""

    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("idle_timeout_s", "header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"EdgeOptions.{name} must be a finite number > 0, got "
                                 f"{value!r}")

    @property
    def sweep_interval_s(self) -> float:
        """How often the fast path looks for connections past a timeout: a timeout is
        enforced within a quarter of itself."""
        return max(0.05, min(self.idle_timeout_s, self.header_timeout_s) / 4)

    def handler_args(self) -> dict[str, float | int]:
        """aiohttp ``RequestHandler`` settings (for ``web.AppRunner(**...)``)."""
        return {"keepalive_timeout": self.idle_timeout_s + self.header_timeout_s,
                "lingering_time": self.body_timeout_s,
                "max_headers": MAX_HEADERS,
                "max_line_size": MAX_HEAD_BYTES - 2,
                "max_field_size": MAX_HEAD_BYTES - 2}

    def argv(self) -> list[str]:
        """As flags of ``python -m cache.worker`` (see :mod:`cache.worker`)."""
        return ["--idle-timeout", repr(self.idle_timeout_s),
                "--header-timeout", repr(self.header_timeout_s),
                "--body-timeout", repr(self.body_timeout_s)]


def head_bytes(request: web.BaseRequest) -> int:
    """A lower bound of the request head's size: the request line, and each field as
    ``name:value`` CRLF (what the client sent was at least this long), so a head the
    fast path took (at most ``MAX_HEAD_BYTES`` as sent) is never refused here."""
    line = len(request.method) + len(request.raw_path) + len(" HTTP/1.1") + 1
    return line + sum(len(k) + len(v) + 3 for k, v in request.raw_headers)


@web.middleware
async def head_limit_middleware(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
    """431 for a head above ``MAX_HEAD_BYTES`` (aiohttp bounds each line, not the sum)."""
    if head_bytes(request) > MAX_HEAD_BYTES:
        return web.json_response(
            {"error": f"request head above {MAX_HEAD_BYTES} bytes"}, status=431,
            headers={"Connection": "close"})
    return await handler(request)


def max_connections(reserved_fds: int = RESERVED_FDS) -> int:
    """Connections this process may hold open and still answer each: its descriptor
    limit less ``reserved_fds``, over ``FDS_PER_CONNECTION`` (at least 1)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, (soft - reserved_fds) // FDS_PER_CONNECTION)


def raise_fd_limit() -> None:
    """Lift the soft descriptor limit to the hard one (as nginx's
    ``worker_rlimit_nofile``): a cache holds a connection per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.info("could not raise the descriptor limit from %d to %d: %s", soft, hard, e)


class NegativeCache:
    """Digests (any hashable key) recently found absent, remembered for ``ttl_s`` and at
    most ``max_entries`` of them (the oldest forgotten first). Pure: every call takes
    ``now`` (monotonic seconds)."""

    def __init__(self, ttl_s: float = NEGATIVE_TTL_S,
                 max_entries: int = MAX_NEGATIVE_ENTRIES) -> None:
        if ttl_s < 0 or max_entries < 1:
            raise ValueError("NegativeCache: ttl_s ≥ 0 and max_entries ≥ 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._until: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def add(self, key: Hashable, now: float) -> None:
        self._until.pop(key, None)
        self._until[key] = now + self.ttl_s
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def absent(self, key: Hashable, now: float) -> bool:
        """Whether ``key`` was found absent less than ``ttl_s`` before ``now``."""
        until = self._until.get(key)
        if until is None:
            return False
        if now >= until:
            del self._until[key]
            return False
        return True

    def discard(self, key: Hashable) -> None:
        self._until.pop(key, None)


class PerKeyRateLimit:
    """At most one event per key per ``interval_s`` (pure: callers pass ``now``), for at
    most ``max_entries`` keys (the oldest forgotten first)."""

    def __init__(self, interval_s: float = VERIFY_INTERVAL_S,
                 max_entries: int = MAX_VERIFY_ENTRIES) -> None:
        if interval_s < 0 or max_entries < 1:
            raise ValueError("PerKeyRateLimit: interval_s ≥ 0 and max_entries ≥ 1")
        self.interval_s = interval_s
        self.max_entries = max_entries
        self._last: OrderedDict[Hashable, float] = OrderedDict()

    def retry_after_s(self, key: Hashable, now: float) -> float:
        """0 if an event for ``key`` may happen at ``now`` (and record it); otherwise
        the seconds until one may."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return self.interval_s - (now - last)
        self._last.pop(key, None)
        self._last[key] = now
        while len(self._last) > self.max_entries:
            self._last.popitem(last=False)
        return 0.0


def check_peers(value: object) -> list[str]:
    """A prefetch body's ``peers``: a list of at most ``MAX_PREFETCH_PEERS`` http(s) URLs
    (trailing ``/`` dropped); :class:`ValueError` naming the field otherwise."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f'"peers" must be a list of URLs, got {type(value).__name__}')
    if len(value) > MAX_PREFETCH_PEERS:
        raise ValueError(f'"peers" names {len(value)} peers; at most {MAX_PREFETCH_PEERS}')
    out = []
    for i, peer in enumerate(value):
        if (not isinstance(peer, str) or len(peer) > MAX_PEER_URL_CHARS
                or not peer.startswith(("http://", "https://"))
                or any(c.isspace() or ord(c) < 0x20 for c in peer)):
            shown = repr(peer)[:80]
            raise ValueError(f'"peers"[{i}] must be an http(s):// URL, got {shown}')
        out.append(peer.rstrip("/"))
    return out


__all__ = ["ACCEPT_BACKOFF_S", "MAX_HEADERS", "MAX_HEAD_BYTES", "EdgeOptions",
           "NegativeCache", "PerKeyRateLimit", "check_peers", "head_bytes",
           "head_limit_middleware", "max_connections", "raise_fd_limit"]
