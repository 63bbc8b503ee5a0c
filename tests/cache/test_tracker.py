"""The holders record (``cache/tracker.py``) with a fake clock, and its routes on a real
cache server: records expire, memory is bounded, answers rotate over holders, and bad
requests are refused naming the field."""

from __future__ import annotations

import urllib.request

import pytest

from bdn.store import BlobStore
from cache.tracker import HolderTracker
from tests.support.cache import StartCache
from tests.support.http import http_get, post_json

D1, D2, D3 = (f"b3:{c * 64}" for c in "123")
A, B, C = "http://10.0.0.1:7471", "http://10.0.0.2:7471", "http://10.0.0.3:7471"


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
