"""A hung cache pod (SIGSTOP: its kernel still accepts connections, nothing answers)
costs a pull about one first-byte deadline more than a pod that is gone, and a chunk
owner that sends no first byte is hedged with the next owner (only-if-cached: the next
owner fills it only once the hung one is suspected).

Real processes on loopback: three cache servers, warmed by a prefetch so both pulls
read from warm caches, and one agent per pull (its own node cache). Time is measured
around each pull; the bound has generous slack for a loaded test machine, and the
failure it guards against is a read timeout (60 s) per wave of chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from agent.fetch import Fetcher
from agent.fetchpolicy import OK, RECEIVER_WAIT_FLOOR_S, TIMEOUT, UNCACHED
from agent.options import MAX_CONNECTIONS, AgentOptions
from bdn.store import BlobStore
from cache.ring import digest_key, ref_key, rendezvous_order
from cache.suspicion import SUSPECTED, TRUSTED
from manifests.digest import Digest
from manifests.manifest import Chunk
from tests.agent.agent_support import (
    Agent,
    Model,
    assert_mount_matches,
    start_cache_server,
)
from tests.support.cache import metrics
from tests.support.http import post_json, recv_until
from tests.support.procs import ServiceProcess

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

FIRST_BYTE_TIMEOUT_S = 1.0
# The bound (2 s) plus slack for a shared two-core machine.
HUNG_EXTRA_BOUND_S = 2.0 + 3.0
WARM_TIMEOUT_S = 60.0


def _warm(cache: ServiceProcess, model: Model) -> None:
    """Fill ``cache`` with every object of ``model`` (prefetch, then wait for it)."""
    status, body = post_json(f"{cache.url}/v1/prefetch", {"manifest": str(model.digest)})
    assert status == 202, body
    deadline = time.monotonic() + WARM_TIMEOUT_S
    while metrics(str(cache.url))["bdn_cache_prefetch_pending"] > 0:  # each probe a round trip
        assert time.monotonic() < deadline, "prefetch did not finish"


def _timed_pull(agent: Agent, model: Model, mount: Path) -> tuple[float, dict]:  # type: ignore[type-arg]
    started = time.monotonic()
    st = agent.client.wait(agent.client.start_pull(ref=model.ref, mount=str(mount))["id"])
    took = time.monotonic() - started
    assert st["state"] == "done", st
    assert_mount_matches(model.src, mount)
    return took, st


class _SilentPod:
    """A listener that accepts connections and never reads or answers them: what a
    SIGSTOPped pod looks like from outside (its kernel completes the handshakes)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the test is over
            with self._cond:
                self.accepted.append(conn)
                self._cond.notify_all()

    def wait_accepted(self, n: int, timeout_s: float = 10.0) -> bool:
        """Whether ``n`` connections were accepted within ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.accepted) >= n, timeout_s)

    def close(self) -> None:
        self.sock.close()
        for c in self.accepted:
            c.close()


def test_a_hung_pod_costs_at_most_about_one_deadline_more_than_a_gone_one(
        tmp_path: Path, store: Path, base: Model, agents: list[Agent]) -> None:
    caches = [start_cache_server(tmp_path, store, f"cache-{i}") for i in range(3)]
    peers = tuple(str(c.url) for c in caches)
    # Hang a pod that owns neither the ref nor the manifest, so it is the chunks' own
    # deadline that finds it (manifests and refs share the suspicion: had it hung on
    # the manifest, no chunk would have asked it).
    front = {rendezvous_order(peers, ref_key(base.ref))[0],
             rendezvous_order(peers, digest_key(base.digest))[0]}
    hung = next(c for c in caches if c.url not in front)
    try:
        for c in caches:
            _warm(c, base)
        extra = ("--strict", "--first-byte-timeout-s", str(FIRST_BYTE_TIMEOUT_S))
        os.killpg(hung.pid, signal.SIGSTOP)
        try:
            a1 = Agent(tmp_path, peers=peers, name="node-hung", extra=extra)
            agents.append(a1)
            t_hung, st_hung = _timed_pull(a1, base, tmp_path / "m-hung")
        finally:
            os.killpg(hung.pid, signal.SIGCONT)
        hung.kill9()
        a2 = Agent(tmp_path, peers=peers, name="node-gone", extra=extra)
        agents.append(a2)
        t_gone, st_gone = _timed_pull(a2, base, tmp_path / "m-gone")
        assert st_hung["bytes_by_tier"]["cluster"] == base.manifest.unique_size
        assert st_gone["bytes_by_tier"]["cluster"] == base.manifest.unique_size
        assert t_hung - t_gone < HUNG_EXTRA_BOUND_S, (t_hung, t_gone)
        counters = dict(ln.split() for ln in a1.client.metrics().splitlines()
                        if ln.startswith("bdn_agent_") and "{" not in ln)
        # Each fetch thread that asked it before it was suspected waited once.
        assert 1 <= float(counters["bdn_agent_timeout_answers_total"]) <= MAX_CONNECTIONS
    finally:
        for c in caches:
            c.stop()


def test_a_chunk_owner_that_sends_no_first_byte_is_hedged_with_the_next(
        tmp_path: Path, base: Model, cache_server: ServiceProcess) -> None:
    """The fetcher alone, against a listener that accepts connections but never answers
    (what a SIGSTOPped pod looks like from outside) and a real cache server."""
    silent = _SilentPod()
    hung = silent.url
    good = str(cache_server.url)
    try:
        options = AgentOptions(cache_dir=tmp_path / "n", budget_bytes=0, peers=(hung, good),
                               strict=True, first_byte_timeout_s=FIRST_BYTE_TIMEOUT_S)
        fetcher = Fetcher(options, None, owners=lambda d: [hung, good])
        chunks = list(base.manifest.unique_chunks().values())[:3]
        chunk = chunks[0]
        buf = bytearray(chunk.length)
        started = time.monotonic()
        result = fetcher.fetch_into(chunk, memoryview(buf))
        took = time.monotonic() - started
        assert result.peer == good and result.tier == "cluster"
        # The hedge is only-if-cached (the good pod is not the owner, and has not filled
        # it): refused. The owner gets one more deadline, shows no sign of life, and is
        # suspected; then the good pod is the one to fill it.
        assert [(a.source, a.outcome) for a in result.answers] == [
            (good, UNCACHED), (hung, TIMEOUT), (good, OK)]
        # Two deadlines, then the next owner's answer: not a read timeout.
        assert took < 2 * FIRST_BYTE_TIMEOUT_S + 5.0, took
        assert fetcher.suspicion.state(hung, time.monotonic()) == SUSPECTED
        # Suspected: the next chunks go to the good peer first, without waiting.
        for c in chunks[1:]:
            r = fetcher.fetch_into(c, memoryview(bytearray(c.length)))
            assert [(a.source, a.outcome) for a in r.answers] == [(good, OK)]
        fetcher.close()
    finally:
        silent.close()


class _TestPeer:
    """A peer on loopback answering one connection at a time: :meth:`answer` gets each
    request's head and writes the reply."""

    def __init__(self, body: bytes, host: str = "127.0.0.1") -> None:
        self.body = body
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the test is over
            self.connections += 1
            with conn:
                self.answer(conn, recv_until(conn, b"\r\n\r\n"))

    def head(self) -> bytes:
        n = len(self.body)
        return (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {n}\r\n"
                f"Content-Range: bytes 0-{n - 1}/{n}\r\n\r\n").encode()

    def answer(self, conn: socket.socket, request: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        # shutdown wakes the accept() blocked on the listening socket; close alone does
        # not (the join then waited out its timeout).
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=10)


class _HeadThenWait(_TestPeer):
    """A peer that answers its first connection's request with a response head and then
    no body until the client gives up (closes), as a pod waiting on its store for the
    fill it streams looks; later connections get the whole answer."""

    def answer(self, conn: socket.socket, request: bytes) -> None:
        if self.connections == 1:
            conn.sendall(self.head())
            while conn.recv(65536):  # until the client closes
                pass
        else:
            conn.sendall(self.head() + self.body)


def test_a_pod_that_sends_the_head_then_waits_is_re_asked_not_suspected(
        tmp_path: Path, store: Path, base: Model, cache_server: ServiceProcess) -> None:
    """A body that does not start after the head is a stall (re-asked), but the pod
    answered: it is not suspected, and the next pod is asked only-if-cached — moving
    the fill there would read the store twice."""
    chunk = next(c for c in base.manifest.unique_chunks().values() if c.length > 1024)
    body = b"".join(BlobStore(str(store)).iter_object(chunk.digest))
    slow = _HeadThenWait(body)
    good = str(cache_server.url)
    try:
        options = AgentOptions(cache_dir=tmp_path / "n", budget_bytes=0,
                               peers=(slow.url, good), strict=True,
                               first_byte_timeout_s=FIRST_BYTE_TIMEOUT_S,
                               stall_timeout_s=0.5)
        fetcher = Fetcher(options, None, owners=lambda d: [slow.url, good])
        result = fetcher.fetch_into(chunk, memoryview(bytearray(chunk.length)))
        assert [(a.source, a.outcome) for a in result.answers] == [
            (slow.url, TIMEOUT), (good, UNCACHED), (slow.url, OK)]
        assert result.answers[0].alive
        assert fetcher.suspicion.state(slow.url, time.monotonic()) == TRUSTED
        assert metrics(good)["bdn_cache_misses_total"] == 0  # the good pod filled nothing
        fetcher.close()
    finally:
        slow.close()


def test_a_holders_lookup_that_timed_out_on_a_silent_pod_suspects_it_then_probes_beside(
        tmp_path: Path, base: Model, cache_server: ServiceProcess) -> None:
    """Sharing on, the owner hung: its holders lookup times out, and it sent nothing on
    any connection for a deadline — the verdict a chunk request would reach a deadline
    later (before this change the chunk still went to it first, costing each agent a
    lookup deadline plus a chunk deadline on the fleet bench). So it is suspected for
    chunks too: the next chunks are planned with the good pod first and looked up
    there, and nothing more is sent to the hung one. Once the quiet period is over it
    is probed beside the pull (``GET /healthz``), never with a chunk's request."""
    silent = _SilentPod()
    hung = silent.url
    good = str(cache_server.url)
    now = [1000.0]
    try:
        options = AgentOptions(cache_dir=tmp_path / "n", budget_bytes=0, peers=(hung, good),
                               strict=True, first_byte_timeout_s=0.3, suspect_s=5.0,
                               peer_advertise="http://127.0.0.1:9")
        fetcher = Fetcher(options, None, owners=lambda d: [hung, good],
                          clock=lambda: now[0])
        chunks = list(base.manifest.unique_chunks().values())[:3]
        sources, peers, _ = fetcher.plan_sources(chunks[0])
        assert sources[:2] == [hung, good] and not peers  # planned before the lookup
        assert fetcher.suspicion.state(hung, now[0]) == SUSPECTED
        for chunk in chunks[1:]:
            sources, peers, _ = fetcher.plan_sources(chunk)
            assert sources[:2] == [good, hung] and not peers
        assert len(silent.accepted) == 1, "asked again while suspected"
        now[0] += 5.0 + 0.1
        sources, _, _ = fetcher.plan_sources(chunks[0])
        assert sources[:2] == [good, hung], "a half-open pod was put first for a chunk"
        assert silent.wait_accepted(2), "no probe once the quiet period was over"
        silent.accepted[1].settimeout(10.0)
        assert silent.accepted[1].recv(4096).startswith(b"GET /healthz ")
        for t in [t for t in threading.enumerate() if t.name == "bdn-probe"]:
            t.join(10.0)
        assert fetcher.suspicion.state(hung, now[0]) == SUSPECTED  # the probe failed
        fetcher.close()
    finally:
        silent.close()


def test_one_verdict_ends_every_wait_on_a_hung_pod(
        tmp_path: Path, base: Model, cache_server: ServiceProcess) -> None:
    """A chunk request is waiting on a hung pod (its grace after a refused hedge) when
    another request — here a holders lookup — finds the pod hung. The waiting request
    is abandoned at once, as a timeout (no bad bytes reported), and the chunk comes
    from the good pod; before this change it waited out its own two deadlines, so an
    agent with 16 requests in flight to a hung pod paid the last one's deadlines."""
    # The lookup's verdict comes one deadline after the request was sent; the request's
    # own would come two (its deadline, then its grace): a deadline's margin.
    deadline_s = 2.0
    silent = _SilentPod()
    hung = silent.url
    good = str(cache_server.url)
    try:
        options = AgentOptions(cache_dir=tmp_path / "n", budget_bytes=0, peers=(hung, good),
                               strict=True, first_byte_timeout_s=deadline_s,
                               peer_advertise="http://127.0.0.1:9")
        fetcher = Fetcher(options, None, owners=lambda d: [hung, good])
        chunks = list(base.manifest.unique_chunks().values())[:2]
        results = {}

        def fetch() -> None:
            c = chunks[0]
            results["r"] = fetcher.fetch_into(c, memoryview(bytearray(c.length)))

        # Not through plan_sources' lookup: this request goes straight to the hung pod.
        fetcher.options = dataclasses.replace(options, peer_advertise=None)
        t = threading.Thread(target=fetch)
        t.start()
        assert silent.wait_accepted(1)
        fetcher.options = options
        fetcher.plan_sources(chunks[1])  # its lookup times out: the verdict
        t.join(30.0)
        answers = [(a.source, a.outcome) for a in results["r"].answers]
        # The verdict lands about when the request's first deadline ends: before or
        # after its hedge (refused, only-if-cached) went out.
        assert answers[-2:] == [(hung, TIMEOUT), (good, OK)], answers
        assert answers[:-2] in ([], [(good, UNCACHED)]), answers
        assert results["r"].answers[-2].detail.startswith("abandoned"), \
            results["r"].answers[-2].detail
        fetcher.close()
    finally:
        silent.close()


class _SlowReceiver(_TestPeer):
    """A peer agent still receiving a chunk: it answers a request that asks it to wait
    (``X-Bdn-Wait-S``) once ``hold_s`` have passed — its own receive finishing — with
    the chunk's bytes."""

    def __init__(self, body: bytes, hold_s: float, host: str = "127.0.0.1") -> None:
        self.hold_s = hold_s
        self.waited = 0
        super().__init__(body, host)

    def answer(self, conn: socket.socket, request: bytes) -> None:
        if b"x-bdn-wait-s:" in request.lower():
            self.waited += 1
            threading.Event().wait(self.hold_s)  # the receive it waits for
        conn.sendall(self.head() + self.body)


def test_a_receivers_waited_answer_does_not_raise_the_first_byte_deadline(
        tmp_path: Path, store: Path, base: Model, cache_server: ServiceProcess) -> None:
    """A peer still receiving the chunk answers once its receive is done: that head's
    latency is the receive's, not the network's. Counted as a head latency it raised
    the first-byte deadline (to 10 s on the fleet bench), and a hung pod then cost
    each chunk that long."""
    floor_s = 0.5
    chunk = next(c for c in base.manifest.unique_chunks().values() if c.length > 1024)
    body = b"".join(BlobStore(str(store)).iter_object(chunk.digest))
    receiver = _SlowReceiver(body, hold_s=0.6)  # < floor + the receiver wait (floor)
    pod = str(cache_server.url)
    try:
        # The pod records the receiver as receiving the chunk (its own lookup), so it
        # points the next asker at it.
        lookup = (f"{pod}/v1/holders/{chunk.digest}?exclude="
                  f"{urllib.parse.quote(receiver.url, safe='')}&receiving=1")
        with urllib.request.urlopen(lookup, timeout=30) as resp:
            assert json.loads(resp.read())["holders"] == []  # the first asker: the pod
        options = AgentOptions(cache_dir=tmp_path / "n", budget_bytes=0, peers=(pod,),
                               strict=True, first_byte_timeout_s=floor_s,
                               peer_advertise="http://127.0.0.1:9")
        fetcher = Fetcher(options, None, owners=lambda d: [pod])
        # A receiver is waited for at least RECEIVER_WAIT_FLOOR_S, whatever the deadline:
        # its own chunk may be waiting on the pods (every agent starts at once).
        assert fetcher.receiver_wait_s(chunk) == RECEIVER_WAIT_FLOOR_S
        result = fetcher.fetch_into(chunk, memoryview(bytearray(chunk.length)))
        assert (result.tier, result.peer) == ("peer", receiver.url), result.answers
        assert receiver.waited == 1
        assert fetcher.first_byte_s() == floor_s, fetcher.first_byte_s()
        fetcher.close()
    finally:
        receiver.close()


class _HalfThenWait(_TestPeer):
    """Sends the head and the first half of the body, then the rest once released."""

    def __init__(self, body: bytes) -> None:
        self.release = threading.Event()
        super().__init__(body)

    def answer(self, conn: socket.socket, request: bytes) -> None:
        half = len(self.body) // 2
        conn.sendall(self.head() + self.body[:half])
        self.release.wait(60)
        conn.sendall(self.body[half:])


def test_a_body_is_heard_from_its_peer_as_it_arrives(tmp_path: Path) -> None:
    """Bytes count as heard while the body comes, not once it is whole: a pod streaming a
    large chunk slowly is alive meanwhile (the silence rule must not cut it off)."""
    body = os.urandom(4 * 1024 * 1024)
    chunk = Chunk(Digest.of(body), 0, len(body))
    peer = _HalfThenWait(body)
    heard_in_body = threading.Event()

    class Listening(Fetcher):
        heard_calls = 0

        def heard(self, p: str) -> None:
            super().heard(p)
            self.heard_calls += 1
            if self.heard_calls == 2:  # the first is the response head
                heard_in_body.set()

    try:
        options = AgentOptions(cache_dir=tmp_path / "n", budget_bytes=0, peers=(peer.url,),
                               stall_timeout_s=60.0)
        fetcher = Listening(options, None, owners=lambda d: [peer.url])
        buf = memoryview(bytearray(chunk.length))
        fetching = threading.Thread(target=fetcher.fetch_into, args=(chunk, buf))
        fetching.start()
        # Half the body is in and the rest held back: the peer was heard meanwhile.
        assert heard_in_body.wait(30), "no byte of the body heard before it was whole"
        assert fetching.is_alive()
        peer.release.set()
        fetching.join(60)
        assert bytes(buf) == body
    finally:
        peer.release.set()
        peer.close()
