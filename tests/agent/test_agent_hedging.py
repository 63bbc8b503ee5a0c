"""No hung peer stalls a pull: the pure policies with a fake clock.

``cache/suspicion.py`` (which peers to pass over, and when to probe them again),
``agent/fetchpolicy.py``'s ``next_source`` after a timeout (the hedge: the next owner
at once, no backoff) and ``stall_timeout_s``. No sockets, no sleeping: ``now`` is an
input everywhere.
"""

from __future__ import annotations

import pytest

from agent.fetchpolicy import (
    ALIVE_TIMEOUTS_PER_TRY,
    CORRUPT,
    MISSING,
    OK,
    STORE,
    TIMEOUT,
    UNCACHED,
    Answer,
    ChunkRetryBudget,
    HeadLatency,
    filler,
    next_source,
    receiver_wait_s,
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


def test_a_chunk_path_never_puts_a_half_open_peer_first_and_probes_it_beside() -> None:
    """``inline_probe=False`` (the agent's chunk fetcher): a half-open peer stays behind
    for every caller, and :meth:`take_probe` hands out one probe per ``suspect_s`` for
    the fetcher to send to ``/healthz`` off the pull's path."""
    clock = FakeClock()
    sus = Suspicion(suspect_s=5.0)
    sus.failed(A, clock.now)
    assert not sus.take_probe(A, clock.now)                # suspected: no probe yet
    clock.advance(5.0)
    assert sus.order([A, B], clock.now, inline_probe=False) == [B, A]
    assert sus.state(A, clock.now) == HALF_OPEN            # ordering took no probe
    assert sus.take_probe(A, clock.now)                    # the one probe
    assert not sus.take_probe(A, clock.now)
    assert sus.order([A, B], clock.now, inline_probe=False) == [B, A]
    assert not sus.take_probe(B, clock.now)                # trusted: nothing to probe
    sus.failed(A, clock.advance(1.0))                      # the probe found it hung
    assert sus.state(A, clock.now) == SUSPECTED
    assert not sus.take_probe(A, clock.advance(9.9))       # doubled: 10 s
    assert sus.take_probe(A, clock.advance(0.1))
    sus.answered(A)                                        # back
    assert sus.order([A, B], clock.now, inline_probe=False) == [A, B]


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


def test_only_one_pod_may_fill_a_chunk_the_others_are_asked_only_if_cached() -> None:
    clock = FakeClock()
    budget = ChunkRetryBudget()
    pods = [A, B, C]
    step = next_source([], pods, budget, now_s=clock.now, draw=0.5, fillers=pods)
    assert (step.source, step.cached_only) == (A, False)  # the owner fills
    # The owner is slow but alive (not suspected, same order); the hedge to B was
    # refused (504): B is not asked again, C is asked only-if-cached, then A again.
    slow = Answer(A, TIMEOUT, clock.now, clock.advance(3.0))
    refused = Answer(B, UNCACHED, clock.now - 1.4, clock.now - 1.4)
    history = [refused, slow]
    step = next_source(history, pods, budget, now_s=clock.now, draw=0.5, fillers=pods)
    assert (step.source, step.cached_only) == (C, True)
    history.append(Answer(C, UNCACHED, clock.now, clock.advance(0.01)))
    step = next_source(history, pods, budget, now_s=clock.now, draw=0.5, fillers=pods)
    assert (step.source, step.cached_only, step.at_s) == (A, False, clock.now)
    # Once the owner is suspected it goes last: B's turn to fill has come, at once,
    # though it said it does not hold the chunk (504s cost no try).
    order = [B, C, A]
    step = next_source(history, order, budget, now_s=clock.now, draw=0.5, fillers=order)
    assert (step.source, step.cached_only, step.at_s) == (B, False, clock.now)
    assert filler(history, order, budget) == B
    # A pod missing the object, or out of tries for it, hands the turn on.
    assert filler([Answer(A, MISSING, 0.0, 1.0)], pods, budget) == B
    bad = [Answer(A, CORRUPT, float(i), float(i)) for i in range(budget.tries_per_source)]
    assert filler(bad, pods, budget) == B
    step = next_source(bad, pods, budget, now_s=bad[-1].ended_s, draw=0.5, fillers=pods)
    assert (step.source, step.cached_only) == (B, False)
    # A pod that served bad bytes hands the turn on (its copy is reported and dropped);
    # when every pod did, the turn comes back to the first.
    corrupt_a = [Answer(A, CORRUPT, 0.0, 0.1)]
    assert filler(corrupt_a, pods, budget) == B
    step = next_source(corrupt_a, pods, budget, now_s=0.1, draw=0.5, fillers=pods)
    assert (step.source, step.cached_only) == (B, False)
    both_bad = [*corrupt_a, Answer(B, CORRUPT, 0.1, 0.2)]
    assert filler(both_bad, pods, budget) == C
    assert filler(both_bad, [A, B], budget) == A
    # Peer agents (not fillers) and the store are never asked only-if-cached.
    step = next_source([], ["http://agent:7471", A, STORE], budget, now_s=0.0, draw=0.5,
                       fillers=[A])
    assert (step.source, step.cached_only) == ("http://agent:7471", False)
    # B refused while A was to fill; then A turned out to miss it: now B fills.
    done = [Answer(B, UNCACHED, 0.0, 0.1), Answer(A, MISSING, 0.0, 0.2)]
    step = next_source(done, [A, B], budget, now_s=0.2, draw=0.5, fillers=[A, B])
    assert (step.source, step.cached_only) == (B, False)


def test_a_slow_but_alive_owner_keeps_its_fill_longer_without_failing_the_pull() -> None:
    """A pod that sent the head and then no body byte within the stall period (its own
    store read is slow) is slow, not hung: such answers use up a try only every
    ALIVE_TIMEOUTS_PER_TRY times — after three plain tries the owner used to be passed
    over and the next pod filled the chunk, a second store read (origin ÷ model
    1.27–1.41 on the fleet bench at 40 Mbit/s). Their time is not waiting: counted in
    the wait budget, it failed pulls there (16 connections per agent)."""
    budget = ChunkRetryBudget(tries_per_source=3, wait_max_s=30.0)
    pods = [A, B]
    history: list[Answer] = []
    t = 0.0
    slow_tries = budget.tries_per_source * ALIVE_TIMEOUTS_PER_TRY
    for n in range(1, slow_tries + 1):
        history.append(Answer(A, TIMEOUT, t, t + 3.0, alive=True))
        history.append(Answer(B, UNCACHED, t + 3.0, t + 3.01))
        t += 3.01
        step = next_source(history, pods, budget, now_s=t, draw=0.5, fillers=pods)
        if n < slow_tries:
            assert filler(history, pods, budget) == A
            assert (step.source, step.cached_only) == (A, False), n
    # Only after 12 slow answers (36 s of them, more than the wait budget) is the
    # owner passed over: B fills.
    assert filler(history, pods, budget) == B
    assert (step.source, step.cached_only) == (B, False)
    # A hung owner's timeouts (not alive) still use up its tries one each.
    hung = [Answer(A, TIMEOUT, float(i), float(i) + 1.0) for i in range(3)]
    assert filler(hung, pods, budget) == B


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


def test_a_receiver_is_waited_for_what_its_receive_takes_within_floor_and_ceiling() -> None:
    MiB = 1024 * 1024
    # Before any transfer: the floor (the first-byte deadline).
    assert receiver_wait_s(16 * MiB, None, floor_s=1.5, ceiling_s=60.0) == 1.5
    # 16 MiB at 64 MiB/s take 0.25 s: 4 × that is 1 s, under the floor.
    assert receiver_wait_s(16 * MiB, 64 * MiB, floor_s=1.5, ceiling_s=60.0) == 1.5
    # At 4 MiB/s: 4 × 4 s.
    assert receiver_wait_s(16 * MiB, 4 * MiB, floor_s=1.5, ceiling_s=60.0) == \
        pytest.approx(16.0)
    # Bounded: a crawl never waits past the ceiling.
    assert receiver_wait_s(16 * MiB, 1024, floor_s=1.5, ceiling_s=60.0) == 60.0
    assert receiver_wait_s(16 * MiB, 0, floor_s=2.0, ceiling_s=1.0) == 1.0


def test_the_first_byte_deadline_follows_what_heads_take_within_floor_and_ceiling() -> None:
    est = HeadLatency()
    # No head seen yet: the configured deadline.
    assert est.deadline_s(floor_s=1.5, ceiling_s=60.0) == 1.5
    # An idle cluster (heads in milliseconds): still the floor, so a hung pod is found
    # within it.
    for _ in range(20):
        est = est.observe(0.005)
    assert est.deadline_s(floor_s=1.5, ceiling_s=60.0) == 1.5
    # Full links: heads queue behind bodies for seconds; the deadline follows (srtt +
    # 4 × rttvar), so a pod that is only queued is not taken for hung.
    for latency in (2.0, 3.0, 2.5, 4.0, 3.0, 2.0, 3.5):
        est = est.observe(latency)
    assert est.srtt_s is not None
    want = est.srtt_s + 4 * est.rttvar_s
    assert 3.0 < want < 60.0
    assert est.deadline_s(floor_s=1.5, ceiling_s=60.0) == pytest.approx(want)
    assert est.deadline_s(floor_s=1.5, ceiling_s=5.0) == 5.0
    # RFC 6298's first sample: srtt = R, rttvar = R / 2.
    first = HeadLatency().observe(0.8)
    assert (first.srtt_s, first.rttvar_s) == (0.8, 0.4)
