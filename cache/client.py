"""The ring client: how a node agent reaches the cluster cache (owners, manifests, refs).

Every object has an owner among the cache peers, chosen by the one placement function
in :mod:`cache.ring` (xxh3 rendezvous; bounded loads over a manifest's chunks once the
client has been told the manifest with :meth:`RingClient.remember`): every client
computes the same order from the same peer list, and the order after the owner is the
failover order. This class holds the one peer list: a static list plus the addresses a
DNS name resolves to (a Kubernetes headless Service), re-resolved every ``dns_ttl_s``.

A request tries the owner, then the next peers (suspected ones last, see
:mod:`cache.suspicion`); a transport error, a timeout, 408, 429 or 5xx moves on to the
next peer at once. When every peer failed, the round is repeated after a capped,
jittered backoff (``bdn.retry.RetryPolicy``, honouring ``Retry-After``); after the last
round the client reads the blob store directly, unless ``strict_origin`` is set (then
the store is never touched and the error names every peer tried). A 404 from a peer is
final: peers read the same store.

What goes through here: manifests (verified here), refs, reports of bad copies and
holders announcements. Chunk bytes do not: the agent fetches them on its own threads
(``agent/fetch.py``) from the owners this client names, and verifies every one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

from bdn.errors import NotFoundError
from bdn.retry import RetryPolicy, is_retryable_status, parse_retry_after
from bdn.store import BlobStore
from cache.errors import (
    CacheError,
    CacheNotFoundError,
    CacheUnavailableError,
)
from cache.ring import (
    Placement,
    digest_key,
    manifest_objects,
    owners_of,
    place,
    ref_key,
    rendezvous_order,
)
from cache.suspicion import Suspicion
from manifests.digest import Digest
from manifests.errors import DigestError, IntegrityError
from manifests.manifest import Manifest
from manifests.refs import Ref

log = logging.getLogger(__name__)

DEFAULT_PORT = 8401
DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_DNS_TTL_S = 10.0
# Rounds over all peers before falling back to the store; short delays: a peer that is
# down is skipped at once, so a round only repeats when *every* peer failed.
DEFAULT_RETRY = RetryPolicy(attempts=3, base_delay_s=0.1, max_delay_s=2.0)
DEFAULT_MAX_CONNECTIONS = 64
REPORT_TIMEOUT_S = 30.0
# Chunks per holders announcement (the cache takes up to 4096).
ANNOUNCE_BATCH = 1024
# Manifests whose placement a client keeps (a node pulls a handful of models).
REMEMBERED_MANIFESTS = 64

T = TypeVar("T")


def _normalise_peer(url: str) -> str:
    url = url.strip().rstrip("/")
    if not (url.startswith("http://") or url.startswith("https://")):
        raise ValueError(f"cache peer {url!r} must be an http:// or https:// base URL")
    return url


@dataclass(frozen=True)
class RingClientOptions:
    """Where the cache peers are and how hard to try them.

    ``peers``: base URLs (``http://10.0.0.5:8401``). ``dns_name``: a name whose addresses
    are peers (``dns_port``, ``scheme``); both may be given. ``strict_origin``: never read
    the blob store directly (fail instead). ``retry``: rounds over all peers.
    """

    peers: tuple[str, ...] = ()
    dns_name: str | None = None
    dns_port: int = DEFAULT_PORT
    scheme: str = "http"
    strict_origin: bool = False
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    retry: RetryPolicy = DEFAULT_RETRY
    dns_ttl_s: float = DEFAULT_DNS_TTL_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if isinstance(self.peers, str):
            raise ValueError("RingClientOptions.peers must be a sequence of URLs, not a str")
        object.__setattr__(self, "peers", tuple(_normalise_peer(p) for p in self.peers))
        if self.dns_name is not None and not self.dns_name.strip():
            raise ValueError("RingClientOptions.dns_name must not be empty")
        if not 0 < self.dns_port < 65536:
            raise ValueError("RingClientOptions.dns_port must be in 1..65535")
        if self.scheme not in ("http", "https"):
            raise ValueError("RingClientOptions.scheme must be 'http' or 'https'")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("RingClientOptions timeouts must be > 0")
        if self.dns_ttl_s < 0:
            raise ValueError("RingClientOptions.dns_ttl_s must be ≥ 0")
        if self.max_connections < 1:
            raise ValueError("RingClientOptions.max_connections must be ≥ 1")


class _PeerFailed(Exception):
    """One peer could not serve; try the next one."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _PeersExhausted(Exception):
    """Every peer failed on every attempt the retry policy allows."""

    def __init__(self, tried: list[str], last_error: str) -> None:
        super().__init__(last_error)
        self.tried = tried
        self.last_error = last_error


class RingClient:
    """Reads objects, manifests and refs through the cache ring (see module docstring).

    ``store`` is the fallback blob store (needed unless ``strict_origin``). ``session``:
    an aiohttp session to share; otherwise one is made on first use and closed by
    :meth:`close`.
    """

    def __init__(self, options: RingClientOptions, store: BlobStore | None = None,
                 session: aiohttp.ClientSession | None = None,
                 suspicion: Suspicion | None = None) -> None:
        if not options.peers and options.dns_name is None and (
                options.strict_origin or store is None):
            raise ValueError("RingClient needs cache peers (peers or dns_name), or a store "
                             "to read when not in strict-origin mode")
        self.options = options
        self.store = store
        self._session = session
        self._own_session = session is None
        self._dns_peers: tuple[str, ...] = ()
        self._dns_resolved_at: float | None = None
        self._dns_lock = asyncio.Lock()
        self._rng = random.Random()
        # Peers that timed out or failed are asked last for a while (cache/suspicion.py);
        # the agent shares its fetcher's, so chunks and manifests agree.
        self.suspicion = suspicion or Suspicion()
        # Manifests this client was told about (newest last, at most REMEMBERED_MANIFESTS)
        # and which of them each chunk key was last seen in; placements are recomputed
        # when the peer set changes. Read from fetch threads: plain dict lookups, and a
        # placement computed twice by a race is the same placement.
        self._objects: dict[str, tuple[tuple[str, int], ...]] = {}
        self._manifest_of: dict[str, str] = {}
        self._placements: dict[str, Placement] = {}

    # -- peers ---------------------------------------------------------------------

    @property
    def peers(self) -> tuple[str, ...]:
        """The current peer set: static peers plus the last DNS answer."""
        return tuple(dict.fromkeys(self.options.peers + self._dns_peers))

    def owners(self, digest: Digest | str) -> list[str]:
        """Peers in failover order for ``digest`` (the owner first): the bounded-load
        placement of the manifest it was last seen in, else plain rendezvous."""
        key = digest_key(digest)
        peers = self.peers
        manifest = self._manifest_of.get(key)
        if manifest is None:
            return rendezvous_order(peers, key)
        placement = self._placements.get(manifest)
        if placement is None or set(placement.peers) != set(peers):
            placement = place(peers, self._objects.get(manifest, ()))
            self._placements[manifest] = placement
        return owners_of(placement, peers, key)

    def remember(self, manifest_digest: Digest | str, manifest: Manifest) -> None:
        """Place ``manifest``'s chunks with bounded loads from now on (see
        :mod:`cache.ring`); the cache's prefetch places the same set the same way."""
        name = digest_key(manifest_digest)
        if name in self._objects:
            return
        objects = tuple(manifest_objects(manifest))
        while len(self._objects) >= REMEMBERED_MANIFESTS:
            old = next(iter(self._objects))
            del self._objects[old]
            self._placements.pop(old, None)
            for key, owner in list(self._manifest_of.items()):
                if owner == old:
                    del self._manifest_of[key]
        self._objects[name] = objects
        for key, _ in objects:
            self._manifest_of[key] = name

    async def refresh_peers(self, *, force: bool = False) -> tuple[str, ...]:
        """Re-resolve ``dns_name`` if its answer is older than ``dns_ttl_s``.

        A failed lookup keeps the previous answer (a DNS blip must not empty the ring).
        """
        name = self.options.dns_name
        if name is None:
            return self.peers
        now = time.monotonic()
        fresh = (self._dns_resolved_at is not None
                 and now - self._dns_resolved_at < self.options.dns_ttl_s)
        if fresh and not force:
            return self.peers
        async with self._dns_lock:
            if (not force and self._dns_resolved_at is not None
                    and time.monotonic() - self._dns_resolved_at < self.options.dns_ttl_s):
                return self.peers
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(name, self.options.dns_port,
                                               type=socket.SOCK_STREAM)
            except OSError as e:
                log.warning("cache peers: resolving %s failed (%s); keeping %d peer(s)",
                            name, e, len(self._dns_peers))
                self._dns_resolved_at = time.monotonic()
                return self.peers
            urls = []
            for family, _, _, _, addr in infos:
                host = str(addr[0])
                host = f"[{host}]" if family == socket.AF_INET6 else host
                urls.append(f"{self.options.scheme}://{host}:{self.options.dns_port}")
            self._dns_peers = tuple(sorted(set(urls)))
            self._dns_resolved_at = time.monotonic()
        return self.peers

    # -- session -------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None,
                                            sock_connect=self.options.connect_timeout_s,
                                            sock_read=self.options.read_timeout_s)
            connector = aiohttp.TCPConnector(limit=self.options.max_connections)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector,
                                                  auto_decompress=False)
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()

    async def __aenter__(self) -> RingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def report_bad(self, digest: Digest, peer: str) -> None:
        """Tell ``peer`` its copy of ``digest`` looked bad; it re-checks and drops it.

        Best effort: a failure is logged, never raised (the caller already has a bad
        chunk to deal with and will read it again).
        """
        url = f"{_normalise_peer(peer)}/v1/objects/{Digest.parse(digest)}/verify"
        try:
            async with self._get_session().post(
                    url, timeout=aiohttp.ClientTimeout(total=REPORT_TIMEOUT_S)) as resp:
                body = await _body(resp)
                if resp.status != 200:
                    log.warning("report of bad %s to %s: HTTP %s %s", digest, peer,
                                resp.status, body)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            log.warning("report of bad %s to %s failed: %s", digest, peer, e)

    # -- holders (node-to-node sharing) ----------------------------------------------

    async def announce_holders(self, agent_url: str, digests: Sequence[Digest | str],
                               *, receiving: bool = False) -> None:
        """Tell each chunk's owning pod that ``agent_url`` holds it (complete, verified),
        or with ``receiving`` that it is still receiving it (renewing that record).

        Best effort, like :meth:`report_bad`: a pod that misses an announcement only
        points fewer requesters at this agent.
        """
        by_owner: dict[str, list[str]] = {}
        for d in digests:
            owners = self.owners(d)
            if owners:
                by_owner.setdefault(owners[0], []).append(digest_key(d))
        for owner, keys in by_owner.items():
            for i in range(0, len(keys), ANNOUNCE_BATCH):
                try:
                    async with self._get_session().post(
                            f"{owner}/v1/holders",
                            json={"agent": agent_url, "digests": keys[i:i + ANNOUNCE_BATCH],
                                  **({"receiving": True} if receiving else {})},
                            timeout=aiohttp.ClientTimeout(total=REPORT_TIMEOUT_S)) as resp:
                        if resp.status != 204:
                            log.info("holders announcement to %s: HTTP %s %s", owner,
                                     resp.status, await _body(resp))
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    log.info("holders announcement to %s failed: %s", owner, e)

    # -- manifests and refs --------------------------------------------------------

    async def get_manifest_bytes(self, digest: Digest) -> bytes:
        """A manifest's canonical bytes, verified against ``digest``."""
        digest = Digest.parse(digest)

        async def from_peer(session: aiohttp.ClientSession, peer: str) -> bytes:
            async with session.get(f"{peer}/v1/manifests/{digest}") as resp:
                await _check(resp, peer, str(digest))
                data = await resp.read()
            try:
                digest.verify(data, where=f"manifest from cache peer {peer}")
            except IntegrityError as e:
                await self.report_bad(digest, peer)
                raise _PeerFailed(str(e)) from e
            return data

        def from_store(store: BlobStore) -> bytes:
            return store.get_manifest_bytes(digest)

        return await self._ask(digest_key(digest), f"manifest {digest}", from_peer,
                               from_store)

    async def resolve_ref(self, ref: Ref) -> Digest:
        """The manifest digest a ref names now (peers cache refs for a few seconds)."""
        if isinstance(ref, str):
            ref = Ref.parse(ref)

        async def from_peer(session: aiohttp.ClientSession, peer: str) -> Digest:
            async with session.get(f"{peer}/v1/refs/{ref.key}") as resp:
                await _check(resp, peer, str(ref))
                try:
                    return Digest.parse(json.loads(await resp.read())["digest"])
                except (ValueError, KeyError, TypeError, DigestError) as e:
                    raise _PeerFailed(f"bad ref answer: {e}") from e

        def from_store(store: BlobStore) -> Digest:
            return store.get_ref(ref)

        return await self._ask(ref_key(ref), f"ref {ref}", from_peer, from_store)

    async def _from_peers(self, owners: list[str], call: Callable[[str], Awaitable[T]]
                          ) -> tuple[T, str, tuple[str, ...]]:
        """``call`` each owner in ring order, again after a backoff, as often as the retry
        policy allows; the first answer wins: ``(value, peer, peers that failed)``.
        Raises :class:`_PeersExhausted` when none answered."""
        tried: list[str] = []
        last_error = "no cache peers"
        policy = self.options.retry
        for attempt in range(1, policy.attempts + 1 if owners else 1):
            retry_after: float | None = None
            for peer in self.suspicion.order(owners, time.monotonic()):
                try:
                    value = await call(peer)
                except (TimeoutError, _PeerFailed, aiohttp.ClientError, OSError) as e:
                    if _hung_or_down(e):
                        self.suspicion.failed(peer, time.monotonic())
                    tried.append(peer)
                    last_error = f"{peer}: {e}"
                    log.info("cache peer failed: %s", last_error)
                    ra = getattr(e, "retry_after_s", None)
                    if ra is not None:
                        retry_after = max(retry_after or 0.0, ra)
                    continue
                self.suspicion.answered(peer)
                return value, peer, tuple(tried)
            if attempt < policy.attempts:
                await asyncio.sleep(policy.delay_s(attempt, retry_after_s=retry_after,
                                                   draw=self._rng.random()))
        raise _PeersExhausted(tried, last_error)

    def _may_use_store(self, what: str, key: str, failed: _PeersExhausted) -> None:
        """Raise :class:`CacheUnavailableError` unless reading the blob store is allowed."""
        if self.options.strict_origin or self.store is None:
            raise CacheUnavailableError(
                f"{what}: no cache peer could serve it (tried "
                f"{', '.join(failed.tried) or 'none'}; last error: {failed.last_error})"
                + ("; strict origin: not reading the blob store"
                   if self.options.strict_origin else ""),
                digest=key, peers_tried=failed.tried, last_error=failed.last_error)

    async def _ask(self, key: str, what: str,
                   from_peer: Callable[[aiohttp.ClientSession, str], Awaitable[T]],
                   from_store: Callable[[BlobStore], T]) -> T:
        await self.refresh_peers()
        try:
            value, _, _ = await self._from_peers(
                rendezvous_order(self.peers, key),
                lambda peer: from_peer(self._get_session(), peer))
            return value
        except _PeersExhausted as e:
            self._may_use_store(what, key, e)
        store = self.store
        try:
            return await asyncio.to_thread(from_store, store)
        except NotFoundError as e:
            if isinstance(e, CacheNotFoundError):
                raise
            raise CacheNotFoundError(str(e), digest=key, url=store.url) from e


async def _body(resp: aiohttp.ClientResponse, limit: int = 500) -> str:
    with contextlib.suppress(Exception):
        text = (await resp.content.read(limit)).decode("utf-8", "replace").strip()
        with contextlib.suppress(ValueError, TypeError, KeyError):
            text = str(json.loads(text)["error"])
        return text
    return ""


async def _check(resp: aiohttp.ClientResponse, peer: str, what: str) -> None:
    if resp.status == 200:
        return
    body = await _body(resp)
    if resp.status == 404:
        raise CacheNotFoundError(f"{what} not found (peer {peer}: {body})", digest=what,
                                 url=peer)
    if is_retryable_status(resp.status):
        raise _PeerFailed(f"HTTP {resp.status}: {body}",
                          retry_after_s=parse_retry_after(resp.headers.get("Retry-After")))
    raise CacheError(f"{what} from {peer}: HTTP {resp.status}: {body}", digest=what,
                     url=peer)


def _hung_or_down(e: BaseException) -> bool:
    """A timeout or a transport failure (not an HTTP answer): the peer may be hung."""
    cause = e.__cause__ if isinstance(e, _PeerFailed) and e.__cause__ is not None else e
    return isinstance(cause, (TimeoutError, aiohttp.ClientConnectionError, OSError))
