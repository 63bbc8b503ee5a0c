"""A replica start is a delivery: the node agent pulls a pushed deployment's code and weights.

:class:`AgentDelivery` implements ``control.backends.Delivery`` over the agent's local
API (``agent.client.AgentClient``, run in a worker thread since it blocks):

- the *code* manifest is pulled into ``MOUNTS/<deployment>/<code digest>/code`` and
  awaited (a model folder is small, and ``bdn serve`` needs its ``config.yaml``);
- the *weights* (the config's entries, each pinned by ``ref`` to the manifest digest
  resolved at push) are pulled with ``prewarm=false`` under
  ``MOUNTS/<deployment>/<code digest>/weights`` and *not* awaited: ``bdn serve`` starts
  at once with ``--pull-events`` (the agent's event stream) and ``--weights-dir``, so
  process start, imports and ``load()`` overlap the download.

Every replica makes its own pulls into the same mount paths: the agent shares a mount
among the pulls that use it and removes it only when the last releases it, so two
replicas of a deployment on a node share one mount, and stopping one releases only its
own pulls (with the release tokens this process's client kept). Only the first
``weights:`` entry is followed by the event stream (``bdn serve`` takes one); the
others are awaited before the replica starts.

:class:`EmbeddedAgent` runs ``bdn agent`` as a child of the control server (node cache
under the state folder, the control plane's store, cluster cache peers if given) for
the one-machine default; real deployments point the server at a running agent instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path

from agent.client import AgentClient
from control.backends import ColdStartRecord, Prepared, ReplicaSpec, _die_with_parent
from control.errors import BackendError

# A unix socket path must fit sockaddr_un (108 bytes on Linux, with the NUL).
MAX_SOCKET_PATH = 100
AGENT_START_TIMEOUT_S = 60.0
AGENT_STOP_GRACE_S = 10.0


class AgentDelivery:
    """Delivers pushed deployments through the node agent at ``address``."""

    def __init__(self, address: str, mounts_root: Path) -> None:
        self.client = AgentClient(address)
        self.mounts_root = mounts_root

    async def prepare(self, spec: ReplicaSpec, replica_id: str) -> Prepared:
        job = asyncio.ensure_future(asyncio.to_thread(self._prepare, spec, replica_id))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            # The thread runs on regardless: release what it started, so a replica
            # stopped while its delivery was being set up leaves no pull behind.
            with contextlib.suppress(Exception):
                await self.release(await job)
            raise

    def _prepare(self, spec: ReplicaSpec, replica_id: str) -> Prepared:
        assert spec.code is not None
        base = self.mounts_root / spec.deployment_id / spec.code.removeprefix("b3:")[:16]
        code_dir = base / "code"
        # No mkdir here: the agent creates a mount's parents itself, and in a replica
        # pod (control.pod) this folder is a read-only view of the node's.
        pulls: list[str] = []
        try:
            code = self.client.start_pull(ref=spec.code, mount=str(code_dir))
            pulls.append(code["id"])
            self.client.wait(code["id"])
            args: list[str] = []
            weights_pull = None
            if spec.weights:
                first = self.client.start_pull(weights=[dict(spec.weights[0])],
                                               mount_root=str(base / "weights"))
                pulls.append(first["id"])
                weights_pull = first["id"]
                for entry in spec.weights[1:]:
                    more = self.client.start_pull(weights=[dict(entry)],
                                                  mount_root=str(base / "weights"))
                    pulls.append(more["id"])
                    self.client.wait(more["id"])
                mount = str(spec.weights[0]["mount_location"]).lstrip("/")
                args = ["--pull-events", self.client.events_url(first["id"]),
                        "--weights-dir", str(base / "weights" / mount)]
        except BaseException as e:
            for pid in pulls:
                with contextlib.suppress(Exception):
                    self.client.release(pid)
            if isinstance(e, Exception):
                raise BackendError(f"the node agent could not deliver deployment "
                                   f"{spec.deployment_id}: {e}", replica=replica_id) from None
            raise
        prepared = Prepared(model_dir=str(code_dir), args=tuple(args), pulls=tuple(pulls),
                            weights_pull=weights_pull)
        return prepared

    async def weights_record(self, prepared: Prepared) -> ColdStartRecord:
        """Seconds and bytes by tier of the replica's weight pulls (all of them done:
        the replica loaded its weights)."""
        return await asyncio.to_thread(self._record, prepared)

    def _record(self, prepared: Prepared) -> ColdStartRecord:
        record = ColdStartRecord()
        tiers: dict[str, int] = {}
        seconds = 0.0
        for pid in prepared.pulls[1:]:  # the first is the code
            st = self.client.status(pid)
            seconds = max(seconds, float(st.get("elapsed_s") or 0.0))
            for tier, n in (st.get("bytes_by_tier") or {}).items():
                tiers[tier] = tiers.get(tier, 0) + int(n)
        record.phases["weights"] = seconds
        record.bytes_by_tier = tiers
        return record

    async def release(self, prepared: Prepared) -> None:
        await asyncio.to_thread(self._release, prepared)

    def _release(self, prepared: Prepared) -> None:
        errors = []
        for pid in prepared.pulls:
            try:
                self.client.release(pid)
            except Exception as e:
                errors.append(f"{pid}: {e}")
        if errors:
            raise BackendError("releasing pulls failed: " + "; ".join(errors))

    async def close(self) -> None:
        return None


def agent_socket_path(state_dir: Path) -> tuple[str, str | None]:
    """Where the embedded agent's socket goes, and a folder made for it (if any).

    The state folder unless the path would not fit a unix socket address; then a fresh
    private folder under the system's temporary folder.
    """
    path = state_dir / "agent" / "agent.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return str(path), None
    folder = tempfile.mkdtemp(prefix="bdn-agent-")
    return os.path.join(folder, "agent.sock"), folder


class EmbeddedAgent:
    """``bdn agent`` as a child process of the control server."""

    def __init__(self, state_dir: Path, store_url: str, *,
                 cache_peers: tuple[str, ...] = (), budget_bytes: int | None = None) -> None:
        self.state_dir = state_dir
        self.store_url = store_url
        self.cache_peers = cache_peers
        self.budget_bytes = budget_bytes
        self.socket, self._socket_dir = agent_socket_path(state_dir)
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.output: list[str] = []

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    async def start(self) -> None:
        cache_dir = self.state_dir / "agent" / "cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "bdn.cli", "agent", "--cache-dir", str(cache_dir),
                "--socket", self.socket, "--store", self.store_url]
        if self.cache_peers:
            argv += ["--peers", ",".join(self.cache_peers)]
        if self.budget_bytes is not None:
            argv += ["--budget-bytes", str(self.budget_bytes)]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_die_with_parent)
        listening: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(listening))
        try:
            await asyncio.wait_for(listening, AGENT_START_TIMEOUT_S)
        except (TimeoutError, EOFError):
            await self.stop()
            tail = "\n".join(self.output[-10:])
            raise BackendError(f"the embedded node agent did not start; its output:\n{tail}"
                               ) from None

    async def _read(self, listening: asyncio.Future[None]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            line = raw.decode(errors="replace").rstrip()
            self.output = [*self.output[-199:], line]
            if not listening.done() and line.startswith("BDN_LISTENING"):
                listening.set_result(None)
        if not listening.done():
            listening.set_exception(EOFError())

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), AGENT_STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 1.0)
        if self._socket_dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.socket)
            with contextlib.suppress(OSError):
                os.rmdir(self._socket_dir)

