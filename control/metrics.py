"""Prometheus text exposition for the control plane, without a client library.

The control plane exposes a handful of gauges (in-flight requests, desired and ready
replicas, queue depth per deployment; a promotion's traffic share per environment),
counters (requests by outcome) and histograms (queue wait, cold start). Requests that
came through an environment's path carry an ``environment`` label as well, so one
environment's traffic can be told apart while a rolling promotion splits it over two
deployments. Gauges are read from the controller's live state at scrape
time, so they cannot drift from what the router and autoscaler use; counters and
histograms are accumulated here. Writing the text format directly (a few dozen lines)
avoids a dependency and a second registry to keep in step.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Cold starts range from well under a second (tiny models) to minutes (large weights).
COLD_START_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_WAIT_BUCKETS_S = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(labels: Labels | Mapping[str, str]) -> str:
    items = labels.items() if isinstance(labels, Mapping) else labels
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in items)
    return "{" + inner + "}" if inner else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


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

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, (counts, acc) in sorted(self.series.items()):
            running = 0
            for bound, n in zip([*self.buckets, math.inf], counts, strict=True):
                running += n
                le = (*labels, ("le", _num(bound)))
                out.append(f"{self.name}_bucket{format_labels(le)} {running}")
            out.append(f"{self.name}_sum{format_labels(labels)} {_num(acc[0])}")
            out.append(f"{self.name}_count{format_labels(labels)} {running}")
        return out


@dataclass
class Counter:
    name: str
    help: str
    series: dict[Labels, float] = field(default_factory=dict)

    def inc(self, labels: Labels = (), by: float = 1.0) -> None:
        self.series[labels] = self.series.get(labels, 0.0) + by

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{format_labels(k)} {_num(v)}" for k, v in sorted(self.series.items())]
        return out


def render_gauge(name: str, help_text: str, values: Iterable[tuple[Labels, float]]) -> list[str]:
    out = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    out += [f"{name}{format_labels(k)} {_num(v)}" for k, v in values]
    return out


class Metrics:
    """The control plane's accumulated metrics (gauges are supplied at render time)."""

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
            "bdn_replica_cold_start_phase_seconds",
            "Replica cold starts by phase: slot (waiting for a place to run), weights "
            "(the node agent's delivery), load (to the device), model_init, total.",
            COLD_START_BUCKETS_S)
        self.weight_bytes = Counter(
            "bdn_replica_cold_start_bytes_total",
            "Weight bytes delivered to starting replicas, by tier (node, peer, cluster, "
            "store).")

    def observe_cold_start(self, labels: Labels, total_s: float, record: Any) -> None:
        """One ready replica's cold start (a ``control.backends.ColdStartRecord``)."""
        self.cold_start.observe(total_s, labels)
        for phase, seconds in sorted(record.phases.items()):
            self.cold_start_phase.observe(seconds, (*labels, ("phase", phase)))
        for tier, n in sorted(record.bytes_by_tier.items()):
            self.weight_bytes.inc((*labels, ("tier", tier)), n)

    def render(self, gauges: Sequence[tuple[str, str, list[tuple[Labels, float]]]]) -> str:
        lines: list[str] = []
        for name, help_text, values in gauges:
            lines += render_gauge(name, help_text, values)
        for metric in (self.requests, self.replica_starts, self.queue_wait, self.cold_start,
                       self.cold_start_phase, self.weight_bytes):
            lines += metric.render()
        return "\n".join(lines) + "\n"
