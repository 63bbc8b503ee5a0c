"""The autoscaling policy: how many replicas a deployment should have, decided purely.

``decide(settings, samples, state, now_s)`` is a pure function of its arguments: no clock,
no I/O, no randomness. The controller calls it every tick with the in-flight samples it
recorded and the state the previous call returned; tests call it with a fake clock and
assert whole replica trajectories. Keeping the policy pure is what makes those
trajectories exact and the policy reviewable on its own (DESIGN.md: policies are pure
functions of their inputs and ``now``).

The rules follow Baseten's documented semantics:

- The load is the time-weighted average of in-flight requests (queued ones included)
  over the last ``autoscaling_window`` seconds. A sample covers the interval since the
  previous sample, so a sample taken the moment a request arrives counts at once: the
  first request at a deployment scaled to zero asks for a replica immediately.
- wanted = ceil(load / (concurrency_target x target_utilization_percentage / 100)),
  bounded by ``min_replica`` and ``max_replica``.
- Scale up at once to ``wanted``. A lowered ``max_replica`` applies at once too.
- Scale down only after the load asked for fewer replicas for the whole
  ``scale_down_delay``; then remove half of the excess (rounded up, so one excess replica
  goes), restart the delay, and repeat until ``wanted`` (``min_replica``, so zero when that
  is zero) is reached. Whenever the load asks for the current count or more, the delay
  timer resets.

Compared with Ray Serve's policy (consecutive-decision counters per control-loop period,
smoothing factors), this one states delays as durations against an explicit ``now``,
which matches the documented settings and does not depend on the tick period.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from control.settings import AutoscalingSettings

# Guards a ceil() against float noise: 2.0000000001 requests must not ask for 3 replicas.
CEIL_EPSILON = 1e-9


@dataclass(frozen=True)
class Sample:
    """In-flight requests (queued included) observed at ``at_s`` (seconds, any epoch)."""

    at_s: float
    in_flight: float


@dataclass(frozen=True)
class ScalerState:
    """What the policy remembers between calls."""

    replicas: int = 0
    # When the load first asked for fewer replicas than ``replicas`` (the scale-down
    # delay runs from here); None while it does not.
    low_since_s: float | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    state: ScalerState
    average_in_flight: float
    wanted: int
    reason: str


def window_average(samples: Sequence[Sample], now_s: float, window_s: float) -> float:
    """Time-weighted mean of in-flight over ``(now_s - window_s, now_s]``.

    Each sample stands for the interval since the sample before it (clipped to the
    window). With no interval to weigh (a single first sample), the newest value counts.
    """
    start = now_s - window_s
    total_w = 0.0
    total = 0.0
    prev_at: float | None = None
    latest: float | None = None
    for s in sorted(samples, key=lambda s: s.at_s):
        if s.at_s > now_s:
            break
        if s.at_s > start:
            latest = s.in_flight
            if prev_at is not None:
                w = s.at_s - max(prev_at, start)
                total_w += w
                total += w * s.in_flight
        prev_at = s.at_s
    if total_w > 0:
        return total / total_w
    return latest if latest is not None else 0.0


def wanted_replicas(settings: AutoscalingSettings, average_in_flight: float) -> int:
    raw = math.ceil(average_in_flight / settings.per_replica_capacity - CEIL_EPSILON)
    return max(settings.min_replica, min(settings.max_replica, max(raw, 0)))


def decide(settings: AutoscalingSettings, samples: Sequence[Sample], state: ScalerState,
           now_s: float) -> Decision:
    """The replica count for ``now_s`` and the state to pass to the next call."""
    average = window_average(samples, now_s, settings.autoscaling_window)
    wanted = wanted_replicas(settings, average)
    current = state.replicas

    def done(replicas: int, low_since: float | None, reason: str) -> Decision:
        return Decision(replicas, ScalerState(replicas, low_since), average, wanted, reason)

    if current > settings.max_replica:
        return done(settings.max_replica, None, "capped at max_replica")
    if wanted > current:
        return done(wanted, None, "scale up")
    if wanted == current:
        return done(current, None, "steady")
    low_since = state.low_since_s if state.low_since_s is not None else now_s
    if now_s - low_since < settings.scale_down_delay:
        return done(current, low_since, "waiting for scale_down_delay")
    excess = current - wanted
    replicas = current - math.ceil(excess / 2)
    # The next halving waits a whole delay again, counted from this step.
    return done(replicas, now_s if replicas > wanted else None, "scale down")
