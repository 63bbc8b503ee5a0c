"""Prometheus metrics for every bdn service, through ``prometheus_client``.

Each service (cache pod, agent, model server, control plane, mirror service) builds its
own :class:`CollectorRegistry` with :func:`service_registry` — never the library's
global one — so several servers in one process (the tests run many) never see each
other's series. Every registry carries ``bdn_build_info`` (version, python) and the
library's process and platform collectors.

The services keep their counts where they already are (plain ints touched on the event
loop, or summed from worker processes' notes in the cache) and expose them through a
:class:`StateCollector`: a callable that builds metric families from that state at
scrape time. So a gauge can never drift from the state the service acts on, and a
multi-process total is whatever the owner has summed when it is asked. The family
helpers below take label sets per sample because some series carry a label that others
of the same name lack (the control plane's ``environment``), which the library's
fixed-label metric objects cannot express.

Naming (checked by ``promtool check metrics`` in tests/core/test_metrics_promtool.py):
HELP on every family, counters end in ``_total``, units end the name (``_bytes``,
``_seconds``), tiers, phases, states and reasons are labels. One name has one meaning
and one type in every service: ``bdn_cold_start_seconds`` and
``bdn_cold_start_phase_seconds{phase}`` are histograms in the control plane (every
replica it started) and in a model server (its own one cold start).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Info, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from bdn import __version__

# Cold starts range from well under a second (tiny models) to minutes (large weights);
# the control plane and the model server share them so their histograms add up.
COLD_START_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

Labels = Mapping[str, str] | Sequence[tuple[str, str]]


def service_registry() -> CollectorRegistry:
    """A fresh registry with ``bdn_build_info`` and the process/platform collectors."""
    registry = CollectorRegistry(auto_describe=True)
    Info("bdn_build", "The bdn version and Python version of this process.",
         registry=registry).info({"version": __version__,
                                  "python": platform.python_version()})
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class StateCollector(Collector):
    """Metric families built at scrape time by ``collect`` from a service's state."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: registering must not read state that may not exist yet.
        return ()


def _labels(labels: Labels) -> dict[str, str]:
    items = labels.items() if isinstance(labels, Mapping) else labels
    return {k: str(v) for k, v in items}


def gauge(name: str, help_text: str, samples: Iterable[tuple[Labels, float]] = (),
          value: float | None = None) -> GaugeMetricFamily:
    """A gauge family: one unlabelled ``value``, or ``samples`` of (labels, value)."""
    fam = GaugeMetricFamily(name, help_text, value=value)
    for labels, v in samples:
        fam.add_sample(name, _labels(labels), float(v))
    return fam


def counter(name: str, help_text: str, samples: Iterable[tuple[Labels, float]] = (),
            value: float | None = None) -> CounterMetricFamily:
    """A counter family (``name`` ends in ``_total``), like :func:`gauge`."""
    if not name.endswith("_total"):
        raise ValueError(f"counter {name!r} must end in _total")
    fam = CounterMetricFamily(name, help_text, value=value)
    for labels, v in samples:
        fam.add_sample(name, _labels(labels), float(v))
    return fam


def histogram(name: str, help_text: str, buckets: Sequence[float],
              series: Iterable[tuple[Labels, Sequence[int], float]]) -> HistogramMetricFamily:
    """A histogram family from per-series (labels, per-bucket counts, sum).

    ``counts`` has one entry per bound in ``buckets`` plus one for ``+Inf``, each the
    observations in that bucket alone (not cumulative)."""
    fam = HistogramMetricFamily(name, help_text)
    for labels, counts, total in series:
        if len(counts) != len(buckets) + 1:
            raise ValueError(f"histogram {name}: {len(counts)} counts for "
                             f"{len(buckets)} buckets (+Inf)")
        base = _labels(labels)
        running = 0
        for bound, n in zip([*buckets, math.inf], counts, strict=True):
            running += n
            le = "+Inf" if math.isinf(bound) else repr(float(bound))
            fam.add_sample(f"{name}_bucket", {**base, "le": le}, float(running))
        fam.add_sample(f"{name}_count", base, float(running))
        fam.add_sample(f"{name}_sum", base, float(total))
    return fam


def summary(name: str, help_text: str, count: int, total: float) -> SummaryMetricFamily:
    """A summary family without quantiles: ``name_count`` and ``name_sum``."""
    return SummaryMetricFamily(name, help_text, count_value=count, sum_value=total)


def bucket_counts(buckets: Sequence[float], values: Iterable[float]) -> list[int]:
    """Per-bucket counts (``+Inf`` last) of ``values`` for :func:`histogram`."""
    counts = [0] * (len(buckets) + 1)
    for v in values:
        counts[next((i for i, b in enumerate(buckets) if v <= b), len(buckets))] += 1
    return counts


def render(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The exposition of ``registry`` in the format ``accept`` asks for, and its type
    (Prometheus text 0.0.4 unless the scraper asks for a newer one or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def metrics_response(registry: CollectorRegistry, request: web.Request) -> web.Response:
    body, content_type = render(registry, request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type,
                                            "Cache-Control": "no-store"})


def metrics_handler(registry: CollectorRegistry,
                    before: Callable[[], Awaitable[None]] | None = None,
                    ) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The ``GET /metrics`` handler for ``registry``; ``before`` runs first (the cache
    owner collects its worker processes' pending counts there)."""

    async def handle(request: web.Request) -> web.Response:
        if before is not None:
            await before()
        return metrics_response(registry, request)

    return handle


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {name{labels}: value} (for tests, the bench and the demo)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


__all__ = ["COLD_START_BUCKETS_S", "CollectorRegistry", "Metric", "StateCollector",
           "bucket_counts", "counter", "gauge", "histogram", "metrics_handler",
           "metrics_response", "parse_metrics", "render", "service_registry", "summary"]
