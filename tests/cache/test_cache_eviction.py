"""The LRU eviction policy, as a pure function: cases and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.eviction import Candidate, disk_capacity, plan_eviction


def test_nothing_evicted_when_it_fits() -> None:
    plan = plan_eviction([Candidate("a", 10, 1.0)], used_bytes=10, incoming_bytes=5,
                         budget_bytes=20, now=5.0)
    assert plan.fits and plan.victims == ()


def test_least_recently_used_go_first_and_only_as_many_as_needed() -> None:
    cands = [Candidate("new", 10, 9.0), Candidate("old", 10, 1.0), Candidate("mid", 10, 5.0)]
    plan = plan_eviction(cands, used_bytes=30, incoming_bytes=15, budget_bytes=30, now=10.0)
    assert plan.fits and plan.victims == ("old", "mid") and plan.freed_bytes == 20


def test_pinned_objects_are_never_victims() -> None:
    cands = [Candidate("old", 10, 1.0, pinned=True), Candidate("new", 10, 9.0)]
    plan = plan_eviction(cands, used_bytes=20, incoming_bytes=10, budget_bytes=20, now=10.0)
    assert plan.victims == ("new",)


def test_when_room_cannot_be_made_nothing_is_evicted() -> None:
    cands = [Candidate("a", 10, 1.0, pinned=True), Candidate("b", 10, 2.0)]
    plan = plan_eviction(cands, used_bytes=20, incoming_bytes=15, budget_bytes=20, now=3.0)
    assert not plan.fits and plan.victims == ()
    too_big = plan_eviction(cands, used_bytes=20, incoming_bytes=21, budget_bytes=20, now=3.0)
    assert not too_big.fits and too_big.victims == ()


def test_future_access_times_count_as_now() -> None:
    # An entry stamped in the future (clock stepped back) must not outlive everything.
    cands = [Candidate("future", 10, 1e12), Candidate("recent", 10, 99.0)]
    plan = plan_eviction(cands, used_bytes=20, incoming_bytes=10, budget_bytes=20, now=100.0)
    assert plan.victims == ("recent",)
    plan2 = plan_eviction(cands, used_bytes=20, incoming_bytes=10, budget_bytes=20, now=98.0)
    assert plan2.victims == ("future",)  # both clamp to 98; tie broken by key


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.floats(0, 100), st.booleans()),
                max_size=30),
       st.integers(0, 200), st.integers(0, 1000))
def test_plan_properties(entries: list[tuple[int, float, bool]], incoming: int,
                         budget: int) -> None:
    cands = [Candidate(f"k{i}", s, t, p) for i, (s, t, p) in enumerate(entries)]
    used = sum(c.size for c in cands)
    plan = plan_eviction(cands, used_bytes=used, incoming_bytes=incoming, budget_bytes=budget,
                         now=50.0)
    by_key = {c.key: c for c in cands}
    victims = [by_key[k] for k in plan.victims]
    assert all(not v.pinned for v in victims)
    assert plan.freed_bytes == sum(v.size for v in victims)
    if plan.fits:
        assert used - plan.freed_bytes + incoming <= budget
        # LRU: every unpinned survivor was used no earlier than every victim.
        survivors = [c for c in cands if c.key not in plan.victims and not c.pinned]
        if victims and survivors:
            assert (max(min(v.last_access, 50.0) for v in victims)
                    <= min(min(s.last_access, 50.0) for s in survivors))
        # Minimal: without the last victim it would not fit.
        if victims:
            assert used - (plan.freed_bytes - victims[-1].size) + incoming > budget
    else:
        assert plan.victims == ()
        unpinned = sum(c.size for c in cands if not c.pinned)
        assert incoming > budget or used - unpinned + incoming > budget


def test_disk_capacity_is_the_budget_or_what_the_disk_holds() -> None:
    # A roomy disk: the budget decides.
    assert disk_capacity(100, cached_bytes=40, disk_free_bytes=1000, headroom_bytes=10) == 100
    # A small disk: what is cached (evictable) plus what is free, less headroom.
    assert disk_capacity(100, cached_bytes=40, disk_free_bytes=30, headroom_bytes=10) == 60
    # A disk fuller than the headroom: nothing more fits.
    assert disk_capacity(100, cached_bytes=0, disk_free_bytes=5, headroom_bytes=10) == 0
    with pytest.raises(ValueError):
        disk_capacity(100, cached_bytes=-1, disk_free_bytes=0)
