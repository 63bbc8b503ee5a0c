"""Pull requests: the body of ``POST /v1/pulls`` is validated before anything runs."""

from __future__ import annotations

import asyncio

import pytest

from agent.engine import ByteSemaphore, parse_request
from agent.errors import RequestError
from bdn.config import parse_weights
from bdn.errors import PathError
from bdn.mirror_key import mirror_ref

ENTRY = {"source": "hf://acme/llama@abc123", "mount_location": "/models/llama",
         "allow_patterns": ["*.safetensors"]}


def test_weights_entries_resolve_to_mirror_refs_under_the_mount_root() -> None:
    req = parse_request({"weights": [ENTRY, {**ENTRY, "mount_location": "/models/other",
                                             "ref": "team/other:v2"}],
                         "mount_root": "/srv/pods/p1"})
    first, second = req.targets
    assert first.name == str(mirror_ref(parse_weights([ENTRY])[0]))
    assert first.name.startswith("mirrors/") and first.name.endswith(":latest")
    assert first.mount == "/srv/pods/p1/models/llama"
    assert first.allow == ("*.safetensors",)
    assert second.name == "team/other:v2" and second.mount == "/srv/pods/p1/models/other"
    prewarm = parse_request({"weights": [ENTRY], "prewarm": True})
    assert prewarm.targets[0].mount is None


@pytest.mark.parametrize("body, why", [
    ({}, "exactly one"),
    ({"ref": "a/b:c", "weights": [ENTRY]}, "exactly one"),
    ({"ref": "not a ref"}, "namespace/model"),
    ({"ref": "b3:xyz"}, "invalid digest"),
    ({"weights": [{"source": "ftp://x", "mount_location": "/m"}]}, "unsupported scheme"),
    ({"weights": [{**ENTRY, "mount_location": "relative"}]}, "absolute"),
    ({"ref": "a/b:c", "extra": 1}, "unknown field"),
])
def test_bad_requests_are_refused_with_a_reason(body: dict, why: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(RequestError, match=why):
        parse_request(body)


def test_mounts_must_be_absolute_and_free_of_dot_dot() -> None:
    with pytest.raises(PathError):
        parse_request({"ref": "a/b:c", "mount": "/srv/../etc"})
    with pytest.raises(PathError):
        parse_request({"weights": [ENTRY], "mount_root": "rel"})


async def test_byte_semaphore_is_fifo_and_caps_bytes() -> None:
    sem = ByteSemaphore(100)
    await sem.acquire(60)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        await sem.acquire(n)
        order.append(name)

    big = asyncio.create_task(take("big", 80))
    await asyncio.sleep(0)
    small = asyncio.create_task(take("small", 10))
    await asyncio.sleep(0)
    assert order == [], "the small request waits behind the big one (FIFO)"
    sem.release(60)
    await asyncio.wait_for(big, 1)
    await asyncio.wait_for(small, 1)
    assert order == ["big", "small"] and sem.available == 10
    over = asyncio.create_task(sem.acquire(1000))  # above the cap: waits for all of it
    await asyncio.sleep(0)
    assert not over.done()
    sem.release(90)
    await asyncio.wait_for(over, 1)
    assert sem.available == 0
