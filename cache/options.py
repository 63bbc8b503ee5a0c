"""The cache pod's settings: :class:`CacheServerOptions`, its defaults, and how many
serving processes a pod runs by default.

Apart from the server so that ``bdn cache-server``'s parser (:mod:`cache.cli`) and the
worker pool (:mod:`cache.workers`) can read the defaults without the parts that serve,
and so that every part of the server takes the one validated, frozen value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from cache.edge import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    VERIFY_INTERVAL_S,
    EdgeOptions,
)

REF_TTL_S = 5.0
DEFAULT_PREFETCH_RATE_BYTES_PER_S = 100 * 1024 * 1024
DEFAULT_PREFETCH_CONCURRENCY = 2
DEFAULT_FILL_THREADS = 32
DEFAULT_SEND_THREADS = 16
# send_threads left to the server: DEFAULT_SEND_THREADS with one process; with several
# none — each process has its event loop on a core, and sending from the loop costs
# less CPU per response than a thread hop (cache.send).
SEND_THREADS_AUTO = -1


CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_CPU_QUOTA_US = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
CGROUP_V1_CPU_PERIOD_US = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def _cgroup_cpu_limit() -> float | None:
    """The container's CPU limit in CPUs (cgroup quota ÷ period), or None if unlimited."""
    try:
        quota, _, period = Path(CGROUP_V2_CPU_MAX).read_text().partition(" ")
    except OSError:
        try:
            quota = Path(CGROUP_V1_CPU_QUOTA_US).read_text()
            period = Path(CGROUP_V1_CPU_PERIOD_US).read_text()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None  # "max": no limit
    return q / p if q > 0 and p > 0 else None


def default_workers() -> int:
    """Serving processes by default: the CPUs this process may use — those it may run
    on, capped by the container's CPU limit — at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


@dataclass(frozen=True)
class CacheServerOptions:
    """``store_url``: the blob store; ``cache_dir``/``budget_bytes``: the disk store.

    ``prefetch_rate_bytes_per_s`` and ``prefetch_concurrency`` bound background fills;
    ``fill_threads`` bounds concurrent store reads; ``send_threads`` how many responses
    are sent by ``sendfile`` at once off the event loop (0: on the loop), per process
    (default ``SEND_THREADS_AUTO``: none with several workers, 16 with one);
    ``ref_ttl_s`` how long a resolved ref is reused; ``fsync`` makes completed fills
    survive power loss; ``workers`` how many processes serve the port (the owner and
    ``workers`` − 1 hit workers, see :mod:`cache.workers`; default 1; ``default_workers()``
    gives the CPUs the process may use). ``idle_timeout_s``, ``header_timeout_s`` and
    ``body_timeout_s`` bound every connection of the port (see :mod:`cache.edge`);
    ``verify_interval_s``: the least time between two re-hashes of one object by
    ``/verify`` (0: no limit).
    """

    store_url: str
    cache_dir: str
    budget_bytes: int
    prefetch_rate_bytes_per_s: int = DEFAULT_PREFETCH_RATE_BYTES_PER_S
    prefetch_concurrency: int = DEFAULT_PREFETCH_CONCURRENCY
    fill_threads: int = DEFAULT_FILL_THREADS
    send_threads: int = SEND_THREADS_AUTO
    ref_ttl_s: float = REF_TTL_S
    fsync: bool = False
    # One by default: a miss taken by a worker is relayed through it, which costs the cold
    # fill CPU; several pay on nodes whose cores outrun one Python process's sendfile loop.
    workers: int = 1
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    verify_interval_s: float = VERIFY_INTERVAL_S

    @property
    def edge(self) -> EdgeOptions:
        return EdgeOptions(self.idle_timeout_s, self.header_timeout_s, self.body_timeout_s)

    def __post_init__(self) -> None:
        if not self.store_url:
            raise ValueError("CacheServerOptions.store_url is required")
        if not self.cache_dir:
            raise ValueError("CacheServerOptions.cache_dir is required")
        if self.budget_bytes < 0:
            raise ValueError("CacheServerOptions.budget_bytes must be ≥ 0")
        if self.prefetch_rate_bytes_per_s <= 0:
            raise ValueError("CacheServerOptions.prefetch_rate_bytes_per_s must be > 0")
        if self.send_threads < SEND_THREADS_AUTO:
            raise ValueError("CacheServerOptions.send_threads must be ≥ 0 (or "
                             "SEND_THREADS_AUTO)")
        if self.prefetch_concurrency < 1 or self.fill_threads < 1:
            raise ValueError("CacheServerOptions: prefetch_concurrency and fill_threads ≥ 1")
        if self.ref_ttl_s < 0:
            raise ValueError("CacheServerOptions.ref_ttl_s must be ≥ 0")
        if self.workers < 1:
            raise ValueError("CacheServerOptions.workers must be ≥ 1")
        if not self.verify_interval_s >= 0:
            raise ValueError("CacheServerOptions.verify_interval_s must be ≥ 0")
        try:
            self.edge  # noqa: B018 (validates the timeouts)
        except ValueError as e:
            raise ValueError(str(e).replace("EdgeOptions.", "CacheServerOptions.")) from None
        if self.send_threads == SEND_THREADS_AUTO:
            object.__setattr__(self, "send_threads",
                               0 if self.workers > 1 else DEFAULT_SEND_THREADS)
