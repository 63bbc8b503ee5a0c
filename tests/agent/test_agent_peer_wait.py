"""The peer listener and a chunk it is still receiving (``agent/peerserver.py``).

A real :class:`PeerServer` on a loopback port over a real node cache in ``tmp_path``;
the receive is an asyncio future as the engine's in-flight record is, resolved once the
chunk is written and journaled with the agent's own :class:`agent.writer.FileWriter`.
Asked with ``X-Bdn-Wait-S``, the listener waits and serves the verified bytes; without
it, or when the receive fails or outlasts the wait, it answers 404 at once; waiting
requesters are bounded.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.peerserver import WAIT_HEADER, WAITERS_PER_UPLOAD, PeerServer, PeerServerOptions
from agent.writer import FileWriter
from cache.node import NodeCache
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry

DATA = os.urandom(256 * 1024)
CHUNK = Chunk(Digest.of(DATA), 0, len(DATA))


@dataclass
class Peer:
    url: str
    node: NodeCache
    server: PeerServer
    receives: dict[Digest, asyncio.Future[Any]]
    asked: asyncio.Event

    def receive(self) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.receives[CHUNK.digest] = fut
        return fut

    def finish(self) -> None:
        """The receive verified the chunk: write it, journal it, resolve the future."""
        writer = FileWriter.open(self.node, FileEntry.from_chunks("w.bin", [CHUNK]), 1.0)
        try:
            writer.write_verified(CHUNK, memoryview(DATA))
        finally:
            writer.close()
        self.receives.pop(CHUNK.digest).set_result(None)


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    node = NodeCache(tmp_path / "node", 1 << 30)
    receives: dict[Digest, asyncio.Future[Any]] = {}
    asked = asyncio.Event()

    def receiving(digest: Digest) -> asyncio.Future[Any] | None:
        asked.set()  # the listener looks the receive up, then waits in the same step
        return receives.get(digest)

    server = PeerServer(node, PeerServerOptions(max_uploads=1), receiving=receiving)
    runner = web.AppRunner(server.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Peer(f"http://127.0.0.1:{port}", node, server, receives, asked)
    finally:
        await runner.cleanup()
        server.close()
        node.close()


async def _get(url: str, wait_s: float | None = None) -> tuple[int, bytes]:
    headers = {WAIT_HEADER: str(wait_s)} if wait_s is not None else {}
    async with aiohttp.ClientSession() as s, s.get(
            f"{url}/v1/objects/{CHUNK.digest}", headers=headers,
            timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, await r.read()


async def _until_waiting(peer: Peer, n: int) -> None:
    """Until ``n`` requesters have waited on the receive (woken by each lookup)."""
    while peer.server.counters["peer_receiving_waits"] < n:
        peer.asked.clear()
        await peer.asked.wait()


async def test_a_requester_that_waits_gets_the_chunk_once_it_is_verified(peer: Peer) -> None:
    peer.receive()
    asked = asyncio.create_task(_get(peer.url, wait_s=20))
    await _until_waiting(peer, 1)
    assert not asked.done()
    peer.finish()
    status, body = await asked
    assert status == 200 and body == DATA
    assert peer.server.counters["peer_uploads_after_wait"] == 1


async def test_no_wait_asked_a_failed_receive_or_a_wait_that_ran_out_is_404(
        peer: Peer) -> None:
    fut = peer.receive()
    # Without the header, a chunk being received is simply not held yet.
    assert (await _get(peer.url))[0] == 404
    assert (await _get(peer.url, wait_s=float("nan")))[0] == 404
    # The wait runs out (bounded by the requester's own deadline).
    status, body = await _get(peer.url, wait_s=0.05)
    assert status == 404 and b"still being received" in body
    # The receive fails: every waiter is answered at once.
    asked = asyncio.create_task(_get(peer.url, wait_s=20))
    await _until_waiting(peer, 2)
    fut.set_exception(RuntimeError("the pod went away"))
    status, body = await asked
    assert status == 404 and b"failed" in body
    assert peer.server.counters["peer_uploads_after_wait"] == 0


async def test_waiting_requesters_are_bounded(peer: Peer) -> None:
    peer.receive()
    waiting = [asyncio.create_task(_get(peer.url, wait_s=20))
               for _ in range(WAITERS_PER_UPLOAD)]  # max_uploads is 1
    await _until_waiting(peer, WAITERS_PER_UPLOAD)
    assert (await _get(peer.url, wait_s=20))[0] == 503
    peer.finish()
    # With one upload slot, some waiters are told to come back (503), none is lost.
    statuses = [s for s, _ in await asyncio.gather(*waiting)]
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 503}
