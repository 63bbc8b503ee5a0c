"""No hung peer stalls a pull: the pure policies with a fake clock.

``cache/suspicion.py`` (which peers to pass over, and when to probe them again),
``agent/fetchpolicy.py``'s ``next_source`` after a timeout (the hedge: the next owner
at once, no backoff) and ``stall_timeout_s``. No sockets, no sleeping: ``now`` is an
input everywhere.
"""

from __future__ import annotations

import pytest

from agent.fetchpolicy import (
    OK,
    STORE,
    TIMEOUT,
    Answer,
    ChunkRetryBudget,
    next_source,
    stall_timeout_s,
)
from cache.suspicion import HALF_OPEN, SUSPECTED, TRUSTED, Suspicion

A, B, C = "http://a:8401", "http://b:8401", "http://c:8401"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, s: float) -> float:
        self.now += s
        return self.now


def test_a_peer_that_timed_out_is_passed_over_then_probed_once_then_trusted() -> None:
    clock = FakeClock()
    sus = Suspicion(suspect_s=5.0, max_suspect_s=60.0)
    assert sus.order([A, B, C], clock.now) == [A, B, C]
    sus.failed(A, clock.now)
    assert sus.state(A, clock.now) == SUSPECTED
    # Suspected: behind every trusted peer, for every caller, but still there.
    assert sus.order([A, B, C], clock.now) == [B, C, A]
    assert sus.order([C, A], clock.advance(4.9)) == [C, A]
    # Past suspect_s: half-open. The first caller that would ask it first gets the probe;
    # everyone else still passes it over while the probe is out.
    clock.advance(0.2)
    assert sus.state(A, clock.now) == HALF_OPEN
    assert sus.order([B, A], clock.now) == [B, A]      # not first: no probe taken
    assert sus.order([A, B], clock.now) == [A, B]      # the probe
    assert sus.order([A, B], clock.now) == [B, A]      # the others wait for its answer
    assert sus.order([A, C], clock.advance(1.0)) == [C, A]
    sus.answered(A)
    assert sus.state(A, clock.now) == TRUSTED
    assert sus.order([A, B], clock.now) == [A, B]


def test_suspicion_doubles_while_probes_fail_up_to_the_cap() -> None:
    clock = FakeClock()
    sus = Suspicion(suspect_s=5.0, max_suspect_s=12.0)
    periods = []
    for _ in range(4):
        start = clock.now
        sus.failed(B, start)
        # Find when it turns half-open (to the 0.25 s, exact in binary).
        while sus.state(B, clock.now) == SUSPECTED:
            clock.advance(0.25)
        periods.append(clock.now - start)
        assert sus.order([B], clock.now) == [B]  # take the probe; it fails again
    assert periods == [5.0, 10.0, 12.0, 12.0]


def test_a_probe_that_never_reports_back_is_handed_out_again() -> None:
    clock = FakeClock()
    sus = Suspicion(suspect_s=2.0)
    sus.failed(C, clock.now)
    clock.advance(2.0)
    assert sus.order([C], clock.now) == [C]          # probe out; its thread hangs
    assert sus.order([C, A], clock.advance(1.9)) == [A, C]
    assert sus.order([C, A], clock.advance(0.2)) == [C, A]  # a new probe


def test_suspicion_is_validated() -> None:
    with pytest.raises(ValueError, match="suspect_s"):
        Suspicion(suspect_s=10.0, max_suspect_s=5.0)
    with pytest.raises(ValueError, match="suspect_s"):
        Suspicion(suspect_s=-1.0)


def test_after_a_timeout_the_next_owner_is_asked_at_once_and_the_hung_one_last() -> None:
    clock = FakeClock()
    budget = ChunkRetryBudget()
    sources = [A, B, STORE]
    first = next_source([], sources, budget, now_s=clock.now, draw=0.5)
    assert first.source == A and first.at_s == clock.now
    # A did not send its first byte by the deadline (1.5 s later).
    hung = Answer(A, TIMEOUT, clock.now, clock.advance(1.5), "first-byte deadline")
    step = next_source([hung], sources, budget, now_s=clock.now, draw=1.0)
    assert step.source == B and step.at_s == clock.now  # the hedge: no backoff
    # B timed out too: the store next, at once; A only after every source had a turn.
    b_hung = Answer(B, TIMEOUT, clock.now, clock.advance(1.5))
    step = next_source([hung, b_hung], sources, budget, now_s=clock.now, draw=1.0)
    assert step.source == STORE and step.at_s == clock.now
    store_ok = Answer(STORE, OK, clock.now, clock.advance(0.1))
    assert store_ok.outcome == OK
    # Timeouts are faults: past tries_per_source the peer is passed over for the chunk.
    many = [Answer(A, TIMEOUT, float(i), float(i) + 1) for i in range(budget.tries_per_source)]
    step = next_source(many, [A], budget, now_s=100.0, draw=0.5)
    assert step.source is None and "no source left" in step.reason


def test_the_stall_period_follows_the_observed_throughput_within_floor_and_ceiling() -> None:
    # Before any transfer: the floor.
    assert stall_timeout_s(None, floor_s=2.0, ceiling_s=60.0) == 2.0
    # A fast link: the floor (a hiccup of a loaded node is not a stall).
    assert stall_timeout_s(1e9, floor_s=2.0, ceiling_s=60.0) == 2.0
    # A slow link (100 KiB/s): 8 × the time for 1 MiB = 81.92 s, capped by the ceiling.
    assert stall_timeout_s(100 * 1024, floor_s=2.0, ceiling_s=60.0) == 60.0
    # In between: proportional.
    assert stall_timeout_s(1024 * 1024, floor_s=2.0, ceiling_s=60.0) == pytest.approx(8.0)
    assert stall_timeout_s(0, floor_s=2.0, ceiling_s=1.0) == 1.0
