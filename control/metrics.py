"""The control plane's metrics, exposed through :mod:`bdn.metrics` (prometheus_client).

The control plane exposes a handful of gauges (in-flight requests, desired and ready
replicas, queue depth per deployment; a promotion's traffic share per environment),
counters (requests by outcome) and histograms (queue wait, cold start). Requests that
came through an environment's path carry an ``environment`` label as well, so one
environment's traffic can be told apart while a rolling promotion splits it over two
deployments. Gauges are read from the controller's live state at scrape time, so they
cannot drift from what the router and autoscaler use; counters and histograms are
accumulated here. They stay small accumulators of our own rather than the library's
metric objects because one family's series do not all carry the same labels (the
``environment`` label only on environment paths), which those objects cannot express;
the library renders them (:meth:`Metrics.collect` builds its metric families).

Cold starts are reported under the same names and types as a model server's own
(``bdn_cold_start_seconds``, ``bdn_cold_start_phase_seconds{phase}`` histograms): here
one observation per replica the control plane started.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from bdn import metrics as prom
from bdn.metrics import COLD_START_BUCKETS_S

QUEUE_WAIT_BUCKETS_S = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)

Labels = tuple[tuple[str, str], ...]
# (name, help, [(labels, value)]) for each gauge, as the controller reports them.
Gauges = Sequence[tuple[str, str, list[tuple[Labels, float]]]]


@dataclass
class Histogram:
    name: str
    help: str
    buckets: Sequence[float]
    series: dict[Labels, tuple[list[int], list[float]]] = field(default_factory=dict)

    def observe(self, value: float, labels: Labels = ()) -> None:
        counts, acc = self.series.setdefault(labels, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        acc[0] += value

    def count(self, labels: Labels = ()) -> int:
        got = self.series.get(labels)
        return sum(got[0]) if got else 0

    def family(self) -> prom.Metric:
        return prom.histogram(self.name, self.help, self.buckets,
                              [(labels, counts, acc[0])
                               for labels, (counts, acc) in sorted(self.series.items())])


@dataclass
class Counter:
    name: str
    help: str
    series: dict[Labels, float] = field(default_factory=dict)

    def inc(self, labels: Labels = (), by: float = 1.0) -> None:
        self.series[labels] = self.series.get(labels, 0.0) + by

    def family(self) -> prom.Metric:
        return prom.counter(self.name, self.help, sorted(self.series.items()))


class Metrics:
    """The control plane's accumulated metrics (gauges are supplied at scrape time)."""

    def __init__(self) -> None:
        self.cold_start = Histogram(
            "bdn_cold_start_seconds", "Time from starting a replica to its first ready probe.",
            COLD_START_BUCKETS_S)
        self.queue_wait = Histogram(
            "bdn_queue_wait_seconds",
            "Time requests waited in the router queue for a ready replica.",
            QUEUE_WAIT_BUCKETS_S)
        self.requests = Counter("bdn_requests_total",
                                "Requests routed, by deployment, environment (for "
                                "environment paths) and HTTP status.")
        self.replica_starts = Counter("bdn_replica_starts_total",
                                      "Replica starts, by deployment and outcome.")
        self.cold_start_phase = Histogram(
            "bdn_cold_start_phase_seconds",
            "Replica cold starts by phase: slot (waiting for a place to run), weights "
            "(the node agent's delivery), load (to the device), model_init, total.",
            COLD_START_BUCKETS_S)
        self.weight_bytes = Counter(
            "bdn_cold_start_bytes_total",
            "Weight bytes delivered to starting replicas, by tier (node, peer, cluster, "
            "store).")
        # The control server's registry (never the global one: tests run several).
        self.registry = prom.service_registry()

    def observe_cold_start(self, labels: Labels, total_s: float, record: Any) -> None:
        """One ready replica's cold start (a ``control.backends.ColdStartRecord``)."""
        self.cold_start.observe(total_s, labels)
        for phase, seconds in sorted(record.phases.items()):
            self.cold_start_phase.observe(seconds, (*labels, ("phase", phase)))
        for tier, n in sorted(record.bytes_by_tier.items()):
            self.weight_bytes.inc((*labels, ("tier", tier)), n)

    def collect(self, gauges: Gauges) -> Iterator[prom.Metric]:
        for name, help_text, values in gauges:
            yield prom.gauge(name, help_text, values)
        for metric in (self.requests, self.replica_starts, self.queue_wait, self.cold_start,
                       self.cold_start_phase, self.weight_bytes):
            yield metric.family()

    def serve_gauges(self, gauges: Callable[[], Gauges]) -> None:
        """Expose these metrics in :attr:`registry`, with ``gauges()`` read per scrape."""
        self.registry.register(prom.StateCollector(lambda: self.collect(gauges())))

    def render(self, gauges: Gauges) -> str:
        """These metrics alone as Prometheus text (the registry adds the process's)."""
        registry = CollectorRegistry(auto_describe=True)
        registry.register(prom.StateCollector(lambda: self.collect(gauges)))
        return generate_latest(registry).decode()
