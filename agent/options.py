"""The agent's settings: one frozen dataclass, validated when it is built.

Defaults are sized for one GPU node on a fast link: about 1 GiB of chunk bytes in
flight (the issue's figure: enough to keep a 100 Gb/s link busy across a round trip,
small against a node's memory) and 16 connections (ranged requests saturate page-cache
writes well before that; more only adds contention — figures in bench/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.fetchpolicy import (
    DEFAULT_BACKOFF,
    DEFAULT_SUSPECT_S,
    DEFAULT_TRIES_PER_SOURCE,
    DEFAULT_WAIT_MAX_S,
    ChunkRetryBudget,
)
from bdn.retry import RetryPolicy

GiB = 1024 * 1024 * 1024
MAX_BYTES_IN_FLIGHT = 1 * GiB
MAX_CONNECTIONS = 16
# A peer on the cluster network connects in well under a millisecond; past this it is
# gone (a vanished node drops SYNs) and the next owner is asked.
CONNECT_TIMEOUT_S = 1.0
# The response headers of a chunk must arrive within this: a cache pod answers a miss
# as soon as its store read starts (it streams the fill), so only a hung pod (SIGSTOP,
# a wedged process whose kernel still accepts) misses it. The bound: a hung pod
# costs a pull at most ~2 s more than a pod that is gone.
FIRST_BYTE_TIMEOUT_S = 1.5
# A transfer with no byte for this long (at least; longer when the throughput seen so
# far is slow, see agent/fetchpolicy.py's stall_timeout_s) is abandoned and re-asked.
STALL_TIMEOUT_S = 2.0
# The most any single read may wait (the stall detector's ceiling).
READ_TIMEOUT_S = 60.0
# A peer that timed out or failed is passed over this long, doubling per failed probe.
SUSPECT_S = DEFAULT_SUSPECT_S
# Node-to-node sharing: the peer listener's conventional port and upload concurrency.
PEER_PORT = 7471
PEER_MAX_UPLOADS = 8
# The backoff between tries of one chunk (and the ring client's rounds for manifests);
# how many tries and how much waiting a chunk gets are the chunk_* options below, applied
# by ``agent/fetchpolicy.py``.
DEFAULT_RETRY = DEFAULT_BACKOFF
# A peer may give this many corrupt, truncated or failed answers for one chunk before it
# is passed over for that chunk; busy answers (503 + Retry-After) do not count.
CHUNK_TRIES_PER_SOURCE = DEFAULT_TRIES_PER_SOURCE
# The most one chunk may wait between tries (backoff and Retry-After together): long
# enough to ride out a store blip of a few seconds behind the cache, short enough that
# a pull against a dead store fails in well under a minute.
CHUNK_RETRY_WAIT_MAX_S = DEFAULT_WAIT_MAX_S


@dataclass(frozen=True)
class AgentOptions:
    cache_dir: Path
    budget_bytes: int
    peers: tuple[str, ...] = ()
    # A DNS name whose addresses are cache peers (a Kubernetes headless Service),
    # re-resolved by the cluster cache's ring client; ``peers_dns_port`` is their port.
    peers_dns: str | None = None
    peers_dns_port: int = 8401
    store_url: str | None = None
    strict: bool = False
    max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT
    max_connections: int = MAX_CONNECTIONS
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    first_byte_timeout_s: float = FIRST_BYTE_TIMEOUT_S
    stall_timeout_s: float = STALL_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S
    suspect_s: float = SUSPECT_S
    retry: RetryPolicy = field(default_factory=lambda: DEFAULT_RETRY)
    chunk_tries_per_source: int = CHUNK_TRIES_PER_SOURCE
    chunk_retry_wait_max_s: float = CHUNK_RETRY_WAIT_MAX_S
    # Also re-read every chunk of a file from disk and verify it again before publishing.
    # Off by default: every chunk is verified as it lands, and the file digest is the
    # hash of the chunk list (checked when the manifest is parsed), so a published file
    # is exact; the extra pass costs about 0.5 s a GiB here.
    verify_files: bool = False
    # Default place for mounts of requests that give relative mount locations.
    mount_root: Path | None = None
    # Node-to-node sharing: where this agent serves verified chunks to other agents
    # (HOST:PORT, agent/peerserver.py) and the URL other agents reach it at. With an
    # advertised URL the agent announces the chunks it holds to their owning cache pods
    # and asks the holders those pods name before the pods themselves.
    peer_listen: str | None = None
    peer_advertise: str | None = None
    peer_max_uploads: int = PEER_MAX_UPLOADS
    peer_upload_rate_bytes_per_s: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "peers", tuple(p.rstrip("/") for p in self.peers if p))
        if self.budget_bytes < 0:
            raise ValueError("AgentOptions.budget_bytes must be ≥ 0")
        if self.max_bytes_in_flight < 1024 * 1024:
            raise ValueError("AgentOptions.max_bytes_in_flight must be ≥ 1 MiB")
        if not 1 <= self.max_connections <= 1024:
            raise ValueError("AgentOptions.max_connections must be in [1, 1024]")
        for name in ("connect_timeout_s", "first_byte_timeout_s", "stall_timeout_s",
                     "read_timeout_s"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise ValueError(f"AgentOptions.{name} must be in (0, 3600] seconds, "
                                 f"got {value}")
        if self.stall_timeout_s > self.read_timeout_s:
            raise ValueError(f"AgentOptions.stall_timeout_s ({self.stall_timeout_s}) must "
                             f"be ≤ read_timeout_s ({self.read_timeout_s})")
        if not 0 <= self.suspect_s <= 3600:
            raise ValueError(f"AgentOptions.suspect_s must be in [0, 3600] seconds, got "
                             f"{self.suspect_s}")
        if not 1 <= self.chunk_tries_per_source <= 100:
            raise ValueError("AgentOptions.chunk_tries_per_source must be in [1, 100], got "
                             f"{self.chunk_tries_per_source}")
        if not 0 <= self.chunk_retry_wait_max_s <= 3600:
            raise ValueError("AgentOptions.chunk_retry_wait_max_s must be in [0, 3600] "
                             f"seconds, got {self.chunk_retry_wait_max_s}")
        for p in self.peers:
            if not p.startswith(("http://", "https://")):
                raise ValueError(f"peer {p!r} must be an http:// or https:// URL")
        if not 0 < self.peers_dns_port < 65536:
            raise ValueError("AgentOptions.peers_dns_port must be in 1..65535")
        if self.peer_advertise is not None:
            object.__setattr__(self, "peer_advertise", self.peer_advertise.rstrip("/"))
            if not self.peer_advertise.startswith(("http://", "https://")):
                raise ValueError(f"AgentOptions.peer_advertise must be an http(s):// URL, "
                                 f"got {self.peer_advertise!r}")
        if not 1 <= self.peer_max_uploads <= 4096:
            raise ValueError(f"AgentOptions.peer_max_uploads must be in [1, 4096], got "
                             f"{self.peer_max_uploads}")
        if self.peer_upload_rate_bytes_per_s < 0:
            raise ValueError("AgentOptions.peer_upload_rate_bytes_per_s must be ≥ 0 "
                             "(0: unlimited)")
        has_peers = bool(self.peers) or bool(self.peers_dns)
        if self.peer_advertise and not has_peers:
            raise ValueError("node-to-node sharing (--peer-advertise) needs cache peers "
                             "(--peers or --peers-dns): they keep the record of holders")
        if self.strict and not has_peers:
            raise ValueError("strict mode needs at least one cache peer (--peers)")
        if not has_peers and not self.store_url:
            raise ValueError("the agent needs cache peers (--peers) or a blob store (--store)")

    @property
    def chunk_budget(self) -> ChunkRetryBudget:
        """The per-chunk retry budget these options give ``agent/fetchpolicy.py``."""
        return ChunkRetryBudget(tries_per_source=self.chunk_tries_per_source,
                                wait_max_s=self.chunk_retry_wait_max_s, backoff=self.retry)
