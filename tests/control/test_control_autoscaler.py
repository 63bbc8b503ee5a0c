"""The autoscaling policy on a fake clock: exact replica trajectories.

Each scenario samples a load function once a second (as the controller does with its
tick), feeds ``decide`` the samples, the previous state and ``now``, and records the
points where the replica count changes. The expected trajectories are worked out by hand
in the comments from the documented rules, so a change in the policy shows up as a
different trajectory, not as a silently re-frozen number.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import settings as settings_profile
from hypothesis import strategies as st

from control.autoscaler import Sample, ScalerState, decide, window_average
from control.settings import AutoscalingSettings

Trajectory = list[tuple[int, int]]


def simulate(settings: AutoscalingSettings | Callable[[int], AutoscalingSettings],
             load: Callable[[int], float], until: int, *,
             state: ScalerState | None = None) -> Trajectory:
    """(t, replicas) at every change, sampling ``load`` at t = 0, 1, ..., until."""
    state = state or ScalerState()
    samples: list[Sample] = []
    trajectory: Trajectory = []
    for t in range(until + 1):
        s = settings(t) if callable(settings) else settings
        samples.append(Sample(float(t), float(load(t))))
        # Keep what the window needs (as the controller does), so the test stays fast.
        while len(samples) > 1 and samples[1].at_s <= t - s.autoscaling_window:
            samples.pop(0)
        decision = decide(s, samples, state, float(t))
        state = decision.state
        if not trajectory or trajectory[-1][1] != decision.replicas:
            trajectory.append((t, decision.replicas))
    return trajectory


def settings(**kw: int) -> AutoscalingSettings:
    return AutoscalingSettings(**kw)


# -- the average ---------------------------------------------------------------------------

def test_window_average_weights_each_sample_by_the_interval_it_covers() -> None:
    samples = [Sample(0, 100), Sample(1, 0), Sample(2, 0), Sample(4, 6)]
    # Window (0, 4]: 0 for (0,1], 0 for (1,2], 6 for (2,4] -> 12 / 4.
    assert window_average(samples, 4, 10) == pytest.approx(3.0)
    # Window (2, 4]: only the last sample, covering two seconds.
    assert window_average(samples, 4, 2) == pytest.approx(6.0)
    # The sample at 0 only bounds the first interval; its value is outside the window.
    assert window_average(samples, 2, 2) == pytest.approx(0.0)


def test_a_lone_first_sample_counts_and_no_sample_means_no_load() -> None:
    assert window_average([Sample(5, 7)], 5, 60) == 7
    assert window_average([], 5, 60) == 0
    assert window_average([Sample(1, 9)], 100, 60) == 0  # fell out of the window


def test_desired_replicas_is_load_over_target_times_utilisation() -> None:
    s = settings(max_replica=100, concurrency_target=4, target_utilization_percentage=50)
    # Capacity per replica 4 x 0.5 = 2: 7 in flight -> ceil(3.5) = 4.
    assert decide(s, [Sample(0, 7)], ScalerState(), 0).replicas == 4
    # Exactly full is not over: 8 in flight -> 4, not 5 (no float noise).
    assert decide(s, [Sample(0, 8)], ScalerState(), 0).replicas == 4
    s = settings(max_replica=100, concurrency_target=3, target_utilization_percentage=70)
    assert decide(s, [Sample(0, 2.1)], ScalerState(), 0).replicas == 1  # 2.1 / 2.1


# -- the four traffic patterns of the documentation ----------------------------------------

def test_steady_traffic_holds_one_count_without_oscillating() -> None:
    s = settings(min_replica=1, max_replica=10, concurrency_target=5,
                 target_utilization_percentage=100, autoscaling_window=60,
                 scale_down_delay=300)
    # 12 in flight, 5 per replica -> 3 from the first sample, for an hour.
    assert simulate(s, lambda t: 12, 3600) == [(0, 3)]


def test_bursty_traffic_scales_up_as_the_window_fills_and_down_by_halves() -> None:
    s = settings(min_replica=1, max_replica=10, concurrency_target=5,
                 target_utilization_percentage=100, autoscaling_window=60,
                 scale_down_delay=900)

    def load(t: int) -> int:
        return 40 if 100 <= t < 400 else 5

    # Baseline 5 -> 1 replica. From t=100 the 60 s average after k samples of 40 is
    # (300 + 35k) / 60; r replicas are needed once it exceeds 5(r-1): k > 300(r-2)/35,
    # i.e. k = 1, 9, 18, 26, 35, 43, 52 for r = 2..8 (t = 99 + k). 40/5 = 8 is the top.
    # From t=400 the average falls to 35 or less after 9 samples of 5 (t=408): the
    # 900 s delay runs from there. Then halves of the excess over 1: 8 -> 4 -> 2 -> 1,
    # one step per delay.
    assert simulate(s, load, 4000) == [
        (0, 1), (100, 2), (108, 3), (117, 4), (125, 5), (134, 6), (142, 7), (151, 8),
        (1308, 4), (2208, 2), (3108, 1)]


def test_jittery_traffic_is_smoothed_by_a_long_window() -> None:
    def load(t: int) -> int:
        # Baseline 10; a 2x spike for 10 s three times an hour.
        return 20 if any(start <= t < start + 10 for start in (600, 1800, 3000)) else 10

    base = dict(min_replica=1, max_replica=10, concurrency_target=10,
                target_utilization_percentage=70, scale_down_delay=600)
    # Capacity per replica 7. A 300 s window peaks at (290*10 + 10*20)/300 = 10.33 in a
    # spike: ceil(1.48) = 2, the baseline count. Nothing changes.
    assert simulate(settings(autoscaling_window=300, **base), load, 3700) == [(0, 2)]
    # A 10 s window chases each spike: the average reaches 15 > 14 after 5 spike
    # samples (t = start + 4) -> 3; after the spike it is back to 14 or less 6 samples
    # in (start + 15), and the 600 s delay then returns to 2 at start + 615.
    assert simulate(settings(autoscaling_window=10, **base), load, 3700) == [
        (0, 2), (604, 3), (1215, 2), (1804, 3), (2415, 2), (3004, 3), (3615, 2)]


def test_scheduled_traffic_prewarmed_by_raising_min_replica() -> None:
    def load(t: int) -> int:
        return 30 if 1000 <= t < 1600 else 0  # a known batch job

    base = dict(max_replica=5, concurrency_target=5, target_utilization_percentage=100,
                autoscaling_window=60, scale_down_delay=300)

    def prewarmed(t: int) -> AutoscalingSettings:
        # The operator raises min_replica ahead of the job and lowers it after.
        return settings(min_replica=5 if 900 <= t < 1700 else 0, **base)

    # Min 5 at t=900 -> 5 at once (30 in flight asks for 6, capped at 5). At t=1700 min
    # drops to 0 with no load in the window: the 300 s delay, then 5 -> 2 -> 1 -> 0.
    assert simulate(prewarmed, load, 3000) == [(0, 0), (900, 5), (2000, 2), (2300, 1),
                                                (2600, 0)]
    # Without pre-warming the job waits for the window: k samples of 30 average k/2,
    # so r replicas once k > 10(r-1): t = 1000, 1010, 1020, 1030, 1040.
    cold = simulate(settings(min_replica=0, **base), load, 1100)
    assert cold == [(0, 0), (1000, 1), (1010, 2), (1020, 3), (1030, 4), (1040, 5)]


# -- scale-down rules -----------------------------------------------------------------------

def test_scale_down_removes_half_the_excess_per_delay() -> None:
    s = settings(min_replica=0, max_replica=10, autoscaling_window=10, scale_down_delay=60)
    # No load from t=0: low since 0; at 60 remove ceil(10/2)=5, at 120 ceil(5/2)=3,
    # at 180 ceil(2/2)=1, at 240 the last one.
    assert simulate(s, lambda t: 0, 400, state=ScalerState(replicas=10)) == [
        (0, 10), (60, 5), (120, 2), (180, 1), (240, 0)]


def test_scale_down_with_zero_delay_halves_every_tick() -> None:
    s = settings(min_replica=0, max_replica=10, autoscaling_window=10, scale_down_delay=0)
    assert simulate(s, lambda t: 0, 10, state=ScalerState(replicas=8)) == [
        (0, 4), (1, 2), (2, 1), (3, 0)]


def test_returning_traffic_resets_the_scale_down_delay() -> None:
    s = settings(min_replica=0, max_replica=10, concurrency_target=5,
                 target_utilization_percentage=100, autoscaling_window=10,
                 scale_down_delay=60)
    start = ScalerState(replicas=4)

    def drop_only(t: int) -> int:
        return 20 if t < 10 else 0

    # The 10 s average falls to 15 or less (3 replicas) at t=12; 60 s later, t=72,
    # the excess over 0 is halved: 4 -> 2 -> 1 -> 0.
    assert simulate(s, drop_only, 300, state=start) == [(0, 4), (72, 2), (132, 1), (192, 0)]

    def drop_and_return(t: int) -> int:
        return 20 if t < 10 or 50 <= t < 100 else 0

    # Traffic back at t=50 asks for 4 again at t=57 (average 16): the timer resets, so
    # nothing happens at t=72. The second drop is low from t=102; steps at 162, 222, 282.
    assert simulate(s, drop_and_return, 400, state=start) == [
        (0, 4), (162, 2), (222, 1), (282, 0)]


# -- bounds and zero -----------------------------------------------------------------------

def test_max_replica_caps_scale_up_and_a_lowered_max_applies_at_once() -> None:
    s = settings(min_replica=0, max_replica=3, autoscaling_window=10, scale_down_delay=600)
    assert simulate(s, lambda t: 100, 50) == [(0, 3)]

    def lowered(t: int) -> AutoscalingSettings:
        return settings(min_replica=0, max_replica=5 if t < 20 else 2, autoscaling_window=10,
                        scale_down_delay=600)
    assert simulate(lowered, lambda t: 100, 50) == [(0, 5), (20, 2)]


def test_min_replica_is_a_floor_under_no_load() -> None:
    s = settings(min_replica=2, max_replica=6, autoscaling_window=10, scale_down_delay=5)
    # From 6 with no load: after 5 s remove half of 4 -> 4, then 1 of 2... down to 2.
    assert simulate(s, lambda t: 0, 100, state=ScalerState(replicas=6)) == [
        (0, 6), (5, 4), (10, 3), (15, 2)]


def test_scale_to_zero_and_back_on_the_first_request() -> None:
    s = settings(min_replica=0, max_replica=2, autoscaling_window=60, scale_down_delay=30,
                 target_utilization_percentage=100)

    def load(t: int) -> int:
        return 1 if t < 10 or t == 200 else 0

    # One request until t=10: 1 replica. The 60 s average stays above 0 (one replica's
    # worth) until t=69; the 30 s delay ends at t=99 -> 0. At t=200 a single request
    # arrives at the scaled-to-zero deployment: any load asks for a replica at once.
    assert simulate(s, load, 220) == [(0, 1), (99, 0), (200, 1)]


def test_decide_is_pure() -> None:
    s = settings(max_replica=4, autoscaling_window=10, scale_down_delay=10)
    samples = [Sample(0, 3), Sample(1, 3)]
    state = ScalerState(replicas=1)
    first = decide(s, samples, state, 1)
    assert decide(s, samples, state, 1) == first
    assert samples == [Sample(0, 3), Sample(1, 3)] and state == ScalerState(replicas=1)


# -- invariants over arbitrary traffic -----------------------------------------------------

@st.composite
def settings_strategy(draw: st.DrawFn) -> AutoscalingSettings:
    max_replica = draw(st.integers(1, 12))
    return AutoscalingSettings(
        min_replica=draw(st.integers(0, max_replica)), max_replica=max_replica,
        autoscaling_window=draw(st.integers(10, 120)),
        scale_down_delay=draw(st.integers(0, 60)),
        concurrency_target=draw(st.integers(1, 8)),
        target_utilization_percentage=draw(st.integers(1, 100)))


@settings_profile(max_examples=200, deadline=None)
@given(s=settings_strategy(), loads=st.lists(st.integers(0, 60), min_size=1, max_size=300))
def test_policy_invariants_hold_for_any_traffic(s: AutoscalingSettings,
                                                loads: list[int]) -> None:
    state = ScalerState()
    samples: list[Sample] = []
    last_down: float | None = None
    for t, load in enumerate(loads):
        samples.append(Sample(float(t), float(load)))
        before = state.replicas
        d = decide(s, samples, state, float(t))
        state = d.state
        # Always within the configured bounds.
        assert s.min_replica <= d.replicas <= s.max_replica
        # Load at a deployment with no replica asks for one at once.
        if before == 0 and load > 0:
            assert d.replicas >= 1
        if d.replicas < before:
            # Never below what the load asks for, never more than half the excess.
            assert d.replicas >= d.wanted
            assert before - d.replicas == -(-(before - d.wanted) // 2)
            # Consecutive scale-down steps are a whole delay apart.
            if last_down is not None:
                assert t - last_down >= s.scale_down_delay
            last_down = t
        elif d.replicas > before:
            assert d.replicas == d.wanted  # up at once, straight to what is wanted
            last_down = None
