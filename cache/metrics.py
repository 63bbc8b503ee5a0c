"""The cache pod's counts and the ``/metrics`` families built from them.

The parts of the server (:mod:`cache.fills`, :mod:`cache.serve_objects`, :mod:`cache.prefetch`,
:mod:`cache.verify`) bump plain integers in one :class:`Metrics` on the event loop —
the cheapest bookkeeping a hit can have — and :func:`cache_families` turns them, with
the disk's and the store's own counters, into Prometheus families at scrape time
(through :mod:`bdn.metrics`). With hit workers (:mod:`cache.workers`) the owner is the
one that answers ``/metrics``: each worker's notes are summed into the owner's totals
(:meth:`Metrics.note_worker`) and also kept by process, so the totals count every
process of the pod once and the per-process families split them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from bdn import metrics as prom
from cache.disk import DiskStore
from cache.send import OWNER_WORKER

FILL_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FILL_FAILURE_REASONS = ("integrity", "not_found", "store", "other")


class Metrics:
    """The pod's counts, bumped on the event loop (fill times as a histogram)."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.coalesced = 0
        self.bytes_served = 0
        self.bytes_filled = 0
        self.fill_failures: dict[str, int] = {}
        self.fill_buckets = [0] * (len(FILL_SECONDS_BUCKETS) + 1)
        self.fill_sum_s = 0.0
        self.fill_count = 0
        self.prefetch_queued = 0
        self.prefetch_filled = 0
        self.invalidated = 0
        # Hits and bytes served by each worker process (the owner's: the rest).
        self.worker_hits: dict[int, int] = {}
        self.worker_bytes: dict[int, int] = {}

    def observe_fill(self, seconds: float) -> None:
        self.fill_count += 1
        self.fill_sum_s += seconds
        for i, n in enumerate(prom.bucket_counts(FILL_SECONDS_BUCKETS, (seconds,))):
            self.fill_buckets[i] += n

    def fail(self, reason: str) -> None:
        self.fill_failures[reason] = self.fill_failures.get(reason, 0) + 1

    def note_worker(self, worker: int, hits: int, nbytes: int) -> None:
        """Hits and body bytes worker process ``worker`` served since its last note."""
        self.hits += hits
        self.bytes_served += nbytes
        self.worker_hits[worker] = self.worker_hits.get(worker, 0) + hits
        self.worker_bytes[worker] = self.worker_bytes.get(worker, 0) + nbytes


def cache_families(m: Metrics, disk: DiskStore, *, store_object_reads: int,
                   fills_in_flight: int, prefetch_pending: int,
                   processes: Collection[int]) -> Iterator[prom.Metric]:
    """The cache's families (``/metrics``): the owner's counts, in which the worker
    processes' notes are already summed; ``processes``: the indices serving now."""
    u = disk.usage()
    yield prom.counter("bdn_cache_hits_total", "Requests served from disk.", value=m.hits)
    yield prom.counter("bdn_cache_misses_total", "Requests that started a fill.",
                       value=m.misses)
    yield prom.counter("bdn_cache_coalesced_waiters_total",
                       "Requests that joined a fill already in flight.", value=m.coalesced)
    yield prom.counter("bdn_cache_bytes_served_total", "Body bytes sent.",
                       value=m.bytes_served)
    yield prom.counter("bdn_cache_bytes_filled_total",
                       "Verified bytes read from the blob store.", value=m.bytes_filled)
    yield prom.counter("bdn_cache_store_object_reads_total",
                       "Object body reads issued to the blob store.",
                       value=store_object_reads)
    yield prom.counter("bdn_cache_evictions_total", "Objects evicted (LRU).",
                       value=disk.evictions)
    yield prom.counter("bdn_cache_evicted_bytes_total", "Bytes evicted (LRU).",
                       value=disk.evicted_bytes)
    yield prom.counter("bdn_cache_invalidations_total",
                       "Bad copies dropped after a verify request.", value=m.invalidated)
    yield prom.counter("bdn_cache_fill_failures_total", "Fills that failed, by reason.",
                       [({"reason": r}, m.fill_failures.get(r, 0))
                        for r in FILL_FAILURE_REASONS])
    yield prom.histogram("bdn_cache_fill_seconds", "Time from miss to verified object.",
                         FILL_SECONDS_BUCKETS, [({}, m.fill_buckets, m.fill_sum_s)])
    yield prom.gauge("bdn_cache_fills_in_flight", "Fills in progress.",
                     value=fills_in_flight)
    yield prom.counter("bdn_cache_prefetch_queued_total",
                       "Objects queued by prefetch requests.", value=m.prefetch_queued)
    yield prom.counter("bdn_cache_prefetch_filled_total",
                       "Objects filled in the background.", value=m.prefetch_filled)
    yield prom.gauge("bdn_cache_prefetch_pending", "Prefetches not yet done.",
                     value=prefetch_pending)
    yield prom.gauge("bdn_cache_disk_used_bytes", "Bytes of complete objects on disk.",
                     value=u.used_bytes)
    yield prom.gauge("bdn_cache_disk_reserved_bytes", "Bytes reserved by fills.",
                     value=u.reserved_bytes)
    yield prom.gauge("bdn_cache_disk_budget_bytes", "The disk byte budget.",
                     value=u.budget_bytes)
    yield prom.gauge("bdn_cache_objects", "Complete objects on disk.", value=u.objects)
    yield prom.gauge("bdn_cache_processes",
                     "Processes serving the port (the owner and its hit workers).",
                     value=len(processes))
    # The owner's share is the total less what the workers noted: the owner counts
    # its own hits only in the totals.
    workers = sorted({*m.worker_hits, *processes} - {OWNER_WORKER})
    for name, help_, total, per in (
            ("bdn_cache_process_hits_total", "Hits served, by process (0: the owner).",
             m.hits, m.worker_hits),
            ("bdn_cache_process_bytes_served_total",
             "Body bytes sent, by process (0: the owner).", m.bytes_served,
             m.worker_bytes)):
        yield prom.counter(name, help_, [
            ({"worker": str(OWNER_WORKER)}, total - sum(per.values())),
            *(({"worker": str(w)}, per.get(w, 0)) for w in workers)])
