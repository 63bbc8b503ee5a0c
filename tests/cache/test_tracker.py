"""The holders record (``cache/tracker.py``) with a fake clock, and its routes on a real
cache server: records expire, memory is bounded, answers rotate over holders, and bad
requests are refused naming the field."""

from __future__ import annotations

import json
import urllib.request

import pytest

from bdn.store import BlobStore
from cache.tracker import (
    LOAD_WINDOW_S,
    HolderTracker,
    Pointing,
    PointingPolicy,
    Record,
    point,
)
from tests.support.cache import StartCache
from tests.support.http import http_get, post_json

D1, D2, D3 = (f"b3:{c * 64}" for c in "123")
A, B, C, D = (f"http://10.0.0.{i}:7471" for i in range(1, 5))


def test_records_expire_unless_announced_again() -> None:
    t = HolderTracker(ttl_s=30.0)
    now = 100.0
    t.add(A, [D1, D2], now)
    t.add(B, [D1], now + 10)
    assert sorted(t.holders(D1, now + 29, limit=5)) == [A, B]
    # A's record is 30 s old: gone; B's (announced 10 s later) lives on.
    assert t.holders(D1, now + 30, limit=5) == [B]
    assert t.holders(D2, now + 30) == []
    # Announcing again refreshes.
    t.add(A, [D1], now + 35)
    assert sorted(t.holders(D1, now + 39, limit=5)) == [A, B]
    assert t.expire(now + 65) == 1 and len(t) == 0  # B at 40, A at 65: all gone


def test_answers_rotate_over_holders_and_exclude_the_asker() -> None:
    t = HolderTracker()
    t.add(A, [D1], 0.0)
    t.add(B, [D1], 0.0)
    t.add(C, [D1], 0.0)
    firsts = [t.holders(D1, 1.0, limit=1)[0] for _ in range(6)]
    assert firsts == [A, B, C, A, B, C]  # concurrent requesters spread over holders
    assert A not in t.holders(D1, 1.0, exclude=A, limit=3)
    assert t.holders(D3, 1.0) == []


def test_memory_is_bounded_and_bad_copies_are_forgotten() -> None:
    t = HolderTracker(max_holders=2, max_objects=2)
    t.add(A, [D1], 0.0)
    t.add(B, [D1], 0.0)
    t.add(C, [D1], 0.0)      # the oldest announcer of D1 goes
    assert sorted(t.holders(D1, 1.0, limit=5)) == [B, C]
    t.add(A, [D2, D3], 1.0)  # D1, least recently announced, goes
    assert len(t) == 2 and t.holders(D1, 1.0) == []
    t.forget(A, D2)
    assert t.holders(D2, 1.0) == [] and len(t) == 1
    with pytest.raises(ValueError):
        HolderTracker(ttl_s=0)


@pytest.mark.slow
def test_the_cache_server_keeps_the_record(store: BlobStore, start_cache: StartCache) -> None:
    cache = start_cache(store.url)
    assert post_json(f"{cache.url}/v1/holders", {"agent": A, "digests": [D1, D2]})[0] == 204
    status, _, body = http_get(f"{cache.url}/v1/holders/{D1}")
    assert status == 200 and A.encode() in body
    status, _, body = http_get(f"{cache.url}/v1/holders/{D1}?exclude={A}")
    assert status == 200 and A.encode() not in body
    req = urllib.request.Request(f"{cache.url}/v1/holders/{D1}?agent={A}", method="DELETE")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 204
    assert A.encode() not in http_get(f"{cache.url}/v1/holders/{D1}")[2]
    for bad, field in (({"agent": "ftp://x", "digests": [D1]}, '"agent"'),
                       ({"digests": [D1]}, '"agent"'),
                       ({"agent": A, "digests": "b3:x"}, "digests"),
                       ({"agent": A, "digests": ["b3:nothex"]}, "b3"),
                       ({"agent": A, "digests": [D1] * 5000}, "digests")):
        status, err = post_json(f"{cache.url}/v1/holders", bad)
        assert status == 400 and field in str(err["error"]), (bad, err)
    assert http_get(f"{cache.url}/v1/holders/nope")[0] == 400
    status, _, body = http_get(f"{cache.url}/v1/holders/{D1}?exclude=gopher://x")
    assert status == 400 and b'exclude' in body


# -- receivers and pointing (fake clock) -------------------------------------------------

def test_a_receiving_record_expires_quickly_and_a_holding_one_later() -> None:
    t = HolderTracker(ttl_s=30.0, receiving_ttl_s=5.0)
    t.point(D1, 0.0, requester=A, receiving=True)      # A asks first: sent to the pod
    assert t.point(D1, 1.0, requester=B).receiving == (A,)
    # Not renewed: gone after 5 s (a receiver that died stops being handed out).
    assert t.point(D1, 5.0, requester=C) == Pointing()
    t.point(D2, 0.0, requester=A, receiving=True)
    t.add(A, [D2], 4.0, receiving=True)                 # progress renews it
    assert t.point(D2, 8.0, requester=B).receiving == (A,)
    t.add(A, [D2], 8.5)                                 # verified: a holder for 30 s
    got = t.point(D2, 38.0, requester=C)
    assert got.holders == (A,) and got.receiving == ()
    assert t.point(D2, 38.5, requester=C) == Pointing()
    # A late "receiving" renewal never downgrades a holder.
    t.add(B, [D3], 0.0)
    t.add(B, [D3], 1.0, receiving=True)
    assert t.point(D3, 20.0, requester=C) == Pointing(holders=(B,))


def test_the_pod_serves_the_first_asker_and_never_points_one_at_itself() -> None:
    t = HolderTracker()
    assert t.point(D1, 0.0, requester=A, receiving=True) == Pointing()
    # Asked again by the receiver itself (a retry): not pointed at itself.
    assert t.point(D1, 0.1, requester=A, receiving=True) == Pointing()
    got = t.point(D1, 0.2, requester=B, receiving=True)
    assert got.holders[0] == A and got.receiving[0] == A
    # Without pod readers first, receivers are not handed out: the pod is never idle.
    lazy = HolderTracker(policy=PointingPolicy(pod_readers=2))
    lazy.point(D1, 0.0, requester=A, receiving=True)
    assert lazy.point(D1, 0.1, requester=B, receiving=True) == Pointing()
    assert lazy.point(D1, 0.2, requester=C, receiving=True).holders[0] == A


def test_fan_out_per_agent_is_capped_so_receivers_form_a_tree() -> None:
    policy = PointingPolicy(fanout=2, limit=1, window_s=5.0)
    t = HolderTracker(policy=policy)
    agents = [f"http://10.0.1.{i}:7471" for i in range(1, 12)]
    pointed: dict[str, str] = {}
    for i, a in enumerate(agents):
        got = t.point(D1, 0.01 * i, requester=a, receiving=True)
        if got.holders:
            pointed[a] = got.holders[0]
    assert agents[0] not in pointed                  # the root came from the pod
    load = {a: sum(1 for p in pointed.values() if p == a) for a in agents}
    assert max(load.values()) == 2                   # never beyond the cap
    # Every asker was pointed at one that asked before it: a tree, never a cycle.
    assert all(agents.index(p) < agents.index(a) for a, p in pointed.items())
    # Past the window the cap frees up again.
    assert t.point(D1, 10.0, requester="http://10.0.2.1:7471") == Pointing()  # expired
    t.add(agents[0], [D1], 10.0)
    for i in range(2):
        assert t.point(D1, 10.0, requester=f"http://10.0.3.{i}:7471").holders
    assert t.point(D1, 10.0, requester="http://10.0.3.9:7471") == Pointing()
    assert t.point(D1, 15.1, requester="http://10.0.3.9:7471").holders == (agents[0],)


def test_pointing_policy_is_validated() -> None:
    for bad in (dict(limit=0), dict(fanout=0), dict(window_s=0.0), dict(pod_readers=-1),
                dict(pod_window_s=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PointingPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HolderTracker(receiving_ttl_s=0)


def test_point_is_a_pure_function_of_records_and_now() -> None:
    recs = {A: Record(100.0, True, 1.0), B: Record(100.0, True, 0.5),
            C: Record(100.0, False, 2.0, pointed_s=(9.0, 9.5))}
    policy = PointingPolicy(limit=3, fanout=2, window_s=5.0, pod_window_s=30.0)
    # C (a holder) is at its cap; receivers oldest first, only after a pod read.
    assert point(recs, [8.0], 9.6, requester=None, policy=policy) == [B, A]
    assert point(recs, [], 9.6, requester=None, policy=policy) == []
    assert point(recs, [8.0], 9.6, requester=B, policy=policy) == [A]
    # C's pointings left the window: a holder again, first; the pod read still counts.
    assert point(recs, [8.0], 14.6, requester=None, policy=policy) == [C, B, A]
    assert point(recs, [8.0], 38.5, requester=None, policy=policy) == [C]
    # Past their time, records are not handed out.
    assert point(recs, [8.0], 100.0, requester=None, policy=policy) == []


@pytest.mark.slow
def test_the_cache_server_records_receivers_at_lookup(store: BlobStore,
                                                      start_cache: StartCache) -> None:
    cache = start_cache(store.url)
    # A asks first: nobody to point at, so the pod serves it; the lookup records A.
    status, _, body = http_get(f"{cache.url}/v1/holders/{D1}?exclude={A}&receiving=1")
    assert status == 200 and json.loads(body)["holders"] == []
    got = json.loads(http_get(f"{cache.url}/v1/holders/{D1}?exclude={B}&receiving=1")[2])
    assert got["holders"][0] == A and got["receiving"][0] == A
    # A verified it: a holder now, no longer receiving.
    assert post_json(f"{cache.url}/v1/holders", {"agent": A, "digests": [D1]})[0] == 204
    got = json.loads(http_get(f"{cache.url}/v1/holders/{D1}?exclude={C}")[2])
    assert got["holders"][0] == A and A not in got["receiving"]
    # A renewal of a receive.
    assert post_json(f"{cache.url}/v1/holders",
                     {"agent": C, "digests": [D2], "receiving": True})[0] == 204
    for query, field in (("receiving=2", "receiving"), ("receiving=1", "exclude")):
        status, _, body = http_get(f"{cache.url}/v1/holders/{D1}?{query}")
        assert status == 400 and field.encode() in body, body
    status, err = post_json(f"{cache.url}/v1/holders",
                            {"agent": A, "digests": [D1], "receiving": "yes"})
    assert status == 400 and '"receiving"' in str(err["error"])


def test_askers_go_to_the_holder_fewest_were_pointed_at_across_chunks() -> None:
    # A was just handed out for two other chunks; B for none: an asker of D1, which
    # both hold, goes to B first whatever the rotation says (a holder's upload slots
    # are shared by all the chunks it holds, not counted per chunk).
    t = HolderTracker()
    for d in (D1, D2, D3):
        t.add(A, [d], 0.0)
    t.add(B, [D1], 0.0)
    assert t.point(D2, 1.0, requester=C).holders == (A,)
    assert t.point(D3, 1.0, requester=C).holders == (A,)
    for _ in range(2):
        assert t.point(D1, 1.1, requester=C).holders[0] == B
    # ... and once B carries as many, they alternate again.
    firsts = [t.point(D1, 1.2, requester=C).holders[0] for _ in range(4)]
    assert sorted(firsts) == [A, A, B, B]
    # Pure: the load is an input. Receivers stay oldest first (a tree, not a chain)
    # unless one already carries ``fanout`` askers.
    recs = {A: Record(100.0, False, 0.0), B: Record(100.0, False, 0.0),
            C: Record(100.0, True, 0.0), D: Record(100.0, True, 0.5)}
    policy = PointingPolicy(limit=4, fanout=4)
    assert point(recs, [0.0], 5.0, requester=None, policy=policy,
                 load={A: 3, C: 1}) == [B, A, C, D]
    assert point(recs, [0.0], 5.0, requester=None, policy=policy,
                 load={C: 4}) == [A, B, D, C]
    # Past the load window the pointings no longer count: the rotation decides again.
    fresh = HolderTracker()
    fresh.add(A, [D1, D2, D3], 0.0)
    fresh.add(B, [D1], 0.0)
    fresh.point(D2, 0.0, requester=C)
    fresh.point(D3, 0.0, requester=C)
    assert fresh.point(D1, LOAD_WINDOW_S + 0.01, requester=C).holders[0] == A
