"""Replica backends: the declarative contract between the controller and what runs replicas.

The controller decides *how many* replicas a deployment should have and routes to the
ready ones; a backend converges on that number and reports what it observes. Nothing
else crosses the line, so the autoscaler, the promotions and the router do not care
which backend runs (DESIGN.md, "Serving and control")::

    class ReplicaBackend(Protocol):
        name: str
        def subscribe(self, on_change: Callable[[ReplicaStatus], None]) -> None
        async def apply(self, spec: ReplicaSpec, replicas: int,
                        retire: Sequence[str] = ()) -> None
        def observe(self, deployment_id: str) -> list[ReplicaStatus]
        async def remove(self, deployment_id: str) -> None
        async def close(self) -> None

Semantics, which every backend keeps:

- ``apply(spec, n, retire)`` is a *desired state*, not a command: deployment
  ``spec.deployment_id`` should run ``n`` replicas of ``spec`` (at ``spec.revision``).
  It returns at once (no waiting for readiness) and is idempotent: calling it again with
  the same arguments changes nothing. The controller calls it on every evaluation.
- ``retire`` names replicas to remove *first* and now: the controller has already
  drained them (no request routed to them is still running). When ``n`` is below the
  count and ``retire`` does not cover the difference, the backend picks: replicas still
  starting first, then the newest ready ones.
- Replicas of another revision do not count towards ``n``. A backend that can keep them
  (local processes) keeps them until the controller retires them, so they finish their
  requests; one that cannot (a Kubernetes Deployment's own rolling update) replaces them
  as its rollout does.
- Failures are the backend's to retry: a replica that fails to start or exits is
  reported (state ``failed`` or ``stopped`` with ``error``) and replaced to keep ``n``,
  after a backoff that starts at ``start_retry_backoff_s`` and doubles per failure in a
  row (as a kubelet's crash-loop backoff does), reset by the next ready replica.
- ``subscribe`` registers the controller's callback; it is called on the event loop, in
  order, once per observed change of one replica (``starting`` → ``ready`` → ``stopped``,
  or ``starting`` → ``failed``). ``observe`` returns the current view (for adoption after
  a restart and for the API); ``ready`` replicas carry the URL to route to.
- ``remove(deployment_id)`` stops every replica of the deployment and forgets it (the
  deployment was deleted); ``close()`` stops everything this backend started (local) or
  leaves cluster objects in place for the next control plane to adopt (Kubernetes).

Every status a backend reports carries a :class:`ColdStartRecord` once the replica is
ready: seconds by phase (``slot``: waiting for a place to run; ``weights``: the node
agent's delivery; ``load``: loading to the device; ``model_init``: the model's own
initialisation; ``total``: request to ready; where known also ``spawn``: request to
process start, i.e. the code's delivery, and ``waiting_for_weights``: the time the
loader was blocked on bytes not yet delivered) and weight bytes by tier (``node``,
``peer``, ``cluster``, ``store``). Phases overlap by design (weights arrive while the
process starts and loads), so they do not add up to ``total``.

:class:`LocalProcessBackend` (default) runs ``bdn serve MODEL_DIR --listen 127.0.0.1:0``
as child processes in their own sessions. When the spec carries a pushed model (a code
manifest and pinned weights manifests) and the backend has a :class:`Delivery`, a
replica start is a delivery: the node agent pulls the code (small, awaited) and the
weights (not awaited), and ``bdn serve`` starts at once with the agent's event stream,
so process start, imports and ``load()`` overlap the download. The replica's
environment is built from nothing (see :func:`replica_environment`): the control
server's own variables (its API key, other models' secrets) never reach model code.
It reads the ``BDN_LISTENING <url>`` line for the port the replica bound and waits
until ``load()`` returned (``BDN_READY`` on stdout or ``GET /health/ready`` = 200).
Stopping sends SIGTERM to the process group, then SIGKILL after a grace period, and
releases the replica's own pulls. The command is a setting, so tests and operators can
run a different server that speaks the same contract.

:class:`control.kube.KubernetesBackend` implements the same protocol against a
Kubernetes API server (one Deployment per bdn deployment; see its module).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from bdn.service import LOADED_PREFIX, READY_PREFIX
from control.errors import BackendError, RequestError

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT_S = 600.0
DEFAULT_STOP_GRACE_S = 10.0
# A replica still loading serves nothing: it gets less time to go before SIGKILL.
UNREADY_STOP_GRACE_S = 1.0
PR_SET_PDEATHSIG = 1
# The readiness probe starts fast and backs off: a probe costs the loading replica a
# little CPU, and most replicas (``bdn serve``) announce readiness on stdout anyway.
READY_POLL_FIRST_S = 0.02
READY_POLL_MAX_S = 0.1
READY_PROBE_TIMEOUT_S = 2.0
OUTPUT_TAIL_LINES = 40
START_RETRY_BACKOFF_S = 1.0
START_RETRY_BACKOFF_MAX_S = 30.0

# Replica states a backend reports.
STARTING = "starting"
READY = "ready"
FAILED = "failed"
STOPPED = "stopped"

PHASES = ("slot", "weights", "load", "model_init", "total")
TIERS = ("node", "peer", "cluster", "store")

# Variables a Python program needs to run at all; everything else a replica sees is
# listed by its config or set by bdn (replica_environment).
PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH",
                   "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "HF_HOME")


@dataclass(frozen=True)
class ReplicaSpec:
    """What to run: one deployment at one revision.

    ``model_dir`` is a folder the backend can read (a server-side path) when the
    deployment was created from one; a pushed deployment instead names its ``code``
    manifest and ``weights`` (the config's entries, each with ``ref`` pinned to a
    manifest digest), and the backend has the node agent deliver both.
    """

    model_id: str
    deployment_id: str
    deployment_name: str
    model_dir: str
    revision: int = 1
    code: str | None = None
    weights: tuple[Mapping[str, Any], ...] = ()
    environment: str | None = None
    # config.yaml's environment_variables and the declared secrets (values hidden).
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # config.yaml's ``resources:`` (control/resources.py): the Kubernetes backend turns
    # it into requests, limits and a node selector; None means Truss's defaults.
    resources: Mapping[str, Any] | None = None


@dataclass
class ColdStartRecord:
    """One replica start, by phase (seconds) and weight bytes by tier."""

    phases: dict[str, float] = field(default_factory=dict)
    bytes_by_tier: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"phases": {k: round(v, 3) for k, v in self.phases.items()},
                "bytes_by_tier": dict(self.bytes_by_tier)}


@dataclass(frozen=True)
class ReplicaStatus:
    """What a backend observes of one replica (see the module docstring)."""

    id: str
    deployment_id: str
    revision: int
    state: str
    url: str = ""
    pid: int | None = None
    error: str | None = None
    cold_start: ColdStartRecord | None = None
    output: tuple[str, ...] = ()


class ReplicaBackend(Protocol):
    """The declarative backend protocol; its semantics are in the module docstring."""

    name: str

    def subscribe(self, on_change: Callable[[ReplicaStatus], None]) -> None: ...

    async def apply(self, spec: ReplicaSpec, replicas: int,
                    retire: Sequence[str] = ()) -> None: ...

    def observe(self, deployment_id: str) -> list[ReplicaStatus]: ...

    async def remove(self, deployment_id: str) -> None: ...

    async def close(self) -> None: ...


@dataclass
class Replica:
    """A ready replica as the controller and router see it."""

    id: str
    spec: ReplicaSpec
    url: str
    started_at_s: float
    ready_at_s: float
    pid: int | None = None
    ready: bool = False
    in_flight: int = 0
    draining: bool = False
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_TAIL_LINES))
    cold_start: ColdStartRecord = field(default_factory=ColdStartRecord)

    @property
    def cold_start_s(self) -> float:
        return self.ready_at_s - self.started_at_s


@dataclass(frozen=True)
class Prepared:
    """What a delivery produced for one replica: where its code is, how to follow its
    weights, and the pulls to release when it stops."""

    model_dir: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    pulls: tuple[str, ...] = ()
    weights_pull: str | None = None


class Delivery(Protocol):
    """Has the node agent deliver a pushed deployment's code and weights (control.delivery)."""

    async def prepare(self, spec: ReplicaSpec, replica_id: str) -> Prepared: ...

    async def weights_record(self, prepared: Prepared) -> ColdStartRecord: ...

    async def release(self, prepared: Prepared) -> None: ...

    async def close(self) -> None: ...


def replica_environment(spec: ReplicaSpec, replica_id: str,
                        base: Mapping[str, str] | None = None,
                        extra: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """The whole environment of a replica process, built from nothing.

    Only :data:`PASSTHROUGH_ENV` comes from ``base`` (the server's environment); then
    ``config.yaml``'s ``environment_variables`` and the secrets it declares (in
    ``spec.env``, as ``BDN_SECRET_<NAME>``, the form ``serving.runtime.Secrets`` reads),
    then bdn's own variables, which win.
    """
    base = os.environ if base is None else base
    env = {k: base[k] for k in PASSTHROUGH_ENV if k in base}
    env.update(dict(spec.env))
    env.update(dict(extra))
    env["PYTHONUNBUFFERED"] = "1"
    # Pushed code is delivered read-only; a replica must not try to write beside it.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["BDN_REPLICA_ID"] = replica_id
    env["BDN_MODEL_ID"] = spec.model_id
    env["BDN_DEPLOYMENT_ID"] = spec.deployment_id
    if spec.environment:
        env["BDN_ENVIRONMENT"] = spec.environment
    else:
        env.pop("BDN_ENVIRONMENT", None)
    return env


@dataclass(frozen=True)
class LocalBackendOptions:
    """Settings of the local-process backend."""

    # argv prefix; the model folder and ``--listen 127.0.0.1:0`` are appended.
    command: tuple[str, ...] = (sys.executable, "-m", "bdn.cli", "serve")
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    listen_host: str = "127.0.0.1"
    # Added to every replica's environment (operators' and tests' knobs).
    env: tuple[tuple[str, str], ...] = ()
    start_retry_backoff_s: float = START_RETRY_BACKOFF_S

    def __post_init__(self) -> None:
        if not self.command:
            raise RequestError("must name a program", field="command")
        if self.ready_timeout_s <= 0:
            raise RequestError("must be positive", field="ready_timeout_s")
        if self.stop_grace_s < 0:
            raise RequestError("must not be negative", field="stop_grace_s")
        if self.start_retry_backoff_s < 0:
            raise RequestError("must not be negative", field="start_retry_backoff_s")


@dataclass
class _Member:
    """One replica process of a group, from the start request to its stop."""

    id: str
    spec: ReplicaSpec
    state: str = STARTING
    task: asyncio.Task[None] | None = None
    proc: asyncio.subprocess.Process | None = None
    reader: asyncio.Task[None] | None = None
    prepared: Prepared | None = None
    url: str = ""
    error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    cold_start: ColdStartRecord | None = None
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_TAIL_LINES))
    stopping: bool = False


@dataclass
class _Group:
    spec: ReplicaSpec
    target: int = 0
    members: dict[str, _Member] = field(default_factory=dict)
    failures: int = 0
    retry_at: float = 0.0
    retry_timer: asyncio.TimerHandle | None = None


class LocalProcessBackend:
    """Replicas as ``bdn serve`` child processes on free loopback ports."""

    name = "local"

    def __init__(self, options: LocalBackendOptions | None = None,
                 delivery: Delivery | None = None) -> None:
        self.options = options or LocalBackendOptions()
        self.delivery = delivery
        self._session: aiohttp.ClientSession | None = None
        self._groups: dict[str, _Group] = {}
        self._listeners: list[Callable[[ReplicaStatus], None]] = []
        self._stops: set[asyncio.Task[None]] = set()
        self._closing = False

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=READY_PROBE_TIMEOUT_S))
        return self._session

    # -- the protocol ------------------------------------------------------------------

    def subscribe(self, on_change: Callable[[ReplicaStatus], None]) -> None:
        self._listeners.append(on_change)

    async def apply(self, spec: ReplicaSpec, replicas: int,
                    retire: Sequence[str] = ()) -> None:
        if replicas < 0:
            raise RequestError("must not be negative", field="replicas")
        group = self._groups.get(spec.deployment_id)
        if group is None:
            group = self._groups[spec.deployment_id] = _Group(spec)
        group.spec, group.target = spec, replicas
        for rid in retire:
            member = group.members.get(rid)
            if member is not None:
                self._stop_member(group, member)
        self._converge(group)

    def observe(self, deployment_id: str) -> list[ReplicaStatus]:
        group = self._groups.get(deployment_id)
        if group is None:
            return []
        return [self._status(m) for m in group.members.values()]

    async def remove(self, deployment_id: str) -> None:
        group = self._groups.pop(deployment_id, None)
        if group is None:
            return
        if group.retry_timer is not None:
            group.retry_timer.cancel()
        stops = [self._stop_member(group, m) for m in list(group.members.values())]
        await asyncio.gather(*stops, return_exceptions=True)

    async def close(self) -> None:
        self._closing = True
        for dep_id in list(self._groups):
            await self.remove(dep_id)
        if self._stops:
            await asyncio.gather(*self._stops, return_exceptions=True)
        if self.delivery is not None:
            await self.delivery.close()
        if self._session is not None:
            await self._session.close()

    # -- convergence -------------------------------------------------------------------

    def _live(self, group: _Group) -> list[_Member]:
        """Members of the current revision that count towards the target."""
        return [m for m in group.members.values()
                if not m.stopping and m.spec.revision == group.spec.revision]

    def _converge(self, group: _Group) -> None:
        if self._closing:
            return
        live = self._live(group)
        if len(live) > group.target:
            # Starting ones first (they serve nothing yet), then the newest ready ones.
            ordered = sorted(live, key=lambda m: (m.state == READY, m.started_at))
            for member in ordered[:len(live) - group.target]:
                self._stop_member(group, member)
            return
        missing = group.target - len(live)
        if missing <= 0:
            return
        now = time.monotonic()
        if now < group.retry_at:
            if group.retry_timer is None:
                loop = asyncio.get_running_loop()
                group.retry_timer = loop.call_later(group.retry_at - now, self._retry, group)
            return
        for _ in range(missing):
            rid = f"{group.spec.deployment_id}-{os.urandom(3).hex()[:5]}"
            member = _Member(rid, group.spec)
            group.members[rid] = member
            member.task = asyncio.create_task(self._run(group, member))
            self._emit(member)

    def _retry(self, group: _Group) -> None:
        group.retry_timer = None
        if self._groups.get(group.spec.deployment_id) is group:
            self._converge(group)

    def _emit(self, member: _Member) -> None:
        status = self._status(member)
        for listener in list(self._listeners):
            try:
                listener(status)
            except Exception:  # one listener's bug must not stop the backend
                log.exception("replica status listener failed")

    @staticmethod
    def _status(m: _Member) -> ReplicaStatus:
        return ReplicaStatus(id=m.id, deployment_id=m.spec.deployment_id,
                             revision=m.spec.revision, state=m.state, url=m.url,
                             pid=m.proc.pid if m.proc is not None else None, error=m.error,
                             cold_start=m.cold_start, output=tuple(m.output))

    def _back_off(self, group: _Group) -> None:
        """One more failure in a row: the next start waits twice as long."""
        group.failures += 1
        backoff = min(self.options.start_retry_backoff_s * 2 ** (group.failures - 1),
                      START_RETRY_BACKOFF_MAX_S)
        group.retry_at = time.monotonic() + backoff

    # -- one replica -------------------------------------------------------------------

    async def _run(self, group: _Group, member: _Member) -> None:
        """Start one replica and watch it until it exits (or is stopped)."""
        try:
            try:
                # The whole start is bounded: the delivery's set-up, spawn and load().
                await asyncio.wait_for(self._start(member), self.options.ready_timeout_s)
            except TimeoutError:
                raise BackendError(
                    f"replica {member.id} of deployment {member.spec.deployment_id} was not "
                    f"ready within {self.options.ready_timeout_s:.0f} s",
                    replica=member.id) from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            member.error = str(e)
            log.error("replica %s of deployment %s failed to start: %s", member.id,
                      member.spec.deployment_id, e)
            await self._cleanup(member)
            group.members.pop(member.id, None)
            member.state = FAILED
            self._back_off(group)
            self._emit(member)
            self._converge(group)
            return
        group.failures = 0
        group.retry_at = 0.0
        member.state = READY
        self._emit(member)
        assert member.proc is not None
        await member.proc.wait()
        if member.stopping:
            return
        # It exited on its own: report it, and replace it to keep the target.
        tail = "\n".join(list(member.output)[-5:])
        member.error = (f"replica {member.id} exited unexpectedly with status "
                        f"{member.proc.returncode}; last output:\n{tail}")
        log.error("%s", member.error)
        await self._cleanup(member)
        group.members.pop(member.id, None)
        member.state = STOPPED
        self._back_off(group)
        self._emit(member)
        self._converge(group)

    async def _start(self, member: _Member) -> None:
        opts = self.options
        spec = member.spec
        model_dir, args, extra = spec.model_dir, (), ()
        if spec.code is not None:
            if self.delivery is None:
                raise BackendError(
                    f"deployment {spec.deployment_id} was pushed (code {spec.code}) but "
                    "this control server has no node agent to deliver it",
                    replica=member.id)
            member.prepared = await self.delivery.prepare(spec, member.id)
            model_dir = member.prepared.model_dir
            args, extra = member.prepared.args, member.prepared.env
        argv = [*opts.command, model_dir, "--listen", f"{opts.listen_host}:0", *args]
        env = replica_environment(spec, member.id, extra=[*opts.env, *extra])
        log.info("starting replica %s of deployment %s: %s", member.id,
                 spec.deployment_id, " ".join(argv))
        spawned = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_die_with_parent)
        member.proc = proc
        loop = asyncio.get_running_loop()
        url_found: asyncio.Future[str] = loop.create_future()
        loaded: asyncio.Future[None] = loop.create_future()
        member.reader = asyncio.create_task(self._drain(member, url_found, loaded))
        await self._wait_ready(member, url_found, loaded)
        ready_at = time.monotonic()
        record = ColdStartRecord()
        record.phases["slot"] = 0.0  # a local process waits for no scheduler
        phases = await self._replica_phases(member.url)
        if member.prepared is not None and self.delivery is not None:
            weights = await self.delivery.weights_record(member.prepared)
            record.phases.update(weights.phases)
            record.bytes_by_tier = weights.bytes_by_tier
        record.phases.update(phases)
        record.phases["total"] = ready_at - member.started_at
        record.phases.setdefault("weights", 0.0)
        record.phases.setdefault("spawn", spawned - member.started_at)
        member.cold_start = record
        log.info("replica %s of deployment %s ready at %s after %.2f s", member.id,
                 spec.deployment_id, member.url, record.phases["total"])

    async def _replica_phases(self, url: str) -> dict[str, float]:
        """The replica's own view of its cold start (``bdn serve``'s /metrics), if any."""
        out: dict[str, float] = {}
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with self._http().get(f"{url}/metrics") as resp:
                if resp.status != 200:
                    return out
                text = await resp.text()
            names = {"loading_to_device": "load", "model_init": "model_init",
                     "waiting_for_weights": "waiting_for_weights"}
            # Histograms of the replica's one cold start: each phase's sum is its time.
            for line in text.splitlines():
                if line.startswith("bdn_cold_start_phase_seconds_sum{"):
                    label = line.split('phase="', 1)[1].split('"', 1)[0]
                    if label in names:
                        out[names[label]] = float(line.rsplit(" ", 1)[1])
        return out

    async def _drain(self, member: _Member, url_found: asyncio.Future[str],
                     loaded: asyncio.Future[None]) -> None:
        proc = member.proc
        assert proc is not None and proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip()
            member.output.append(line)
            log.debug("replica %s: %s", member.id, line)
            if not url_found.done() and line.startswith(READY_PREFIX):
                url_found.set_result(line[len(READY_PREFIX):].strip())
            # LOADED_PREFIX comes once load() returned: an event, quicker than a probe.
            elif not loaded.done() and line.startswith(LOADED_PREFIX):
                loaded.set_result(None)
        if not url_found.done():
            url_found.set_exception(EOFError())
        if not loaded.done():
            loaded.cancel()

    def _exited(self, member: _Member) -> BackendError:
        tail = "\n".join(list(member.output)[-10:])
        code = member.proc.returncode if member.proc is not None else None
        return BackendError(
            f"replica {member.id} of deployment {member.spec.deployment_id} exited with "
            f"status {code} before it was ready; last output:\n{tail}", replica=member.id)

    async def _wait_ready(self, member: _Member, url_found: asyncio.Future[str],
                          loaded: asyncio.Future[None]) -> None:
        proc = member.proc
        assert proc is not None
        try:
            member.url = await url_found
        except EOFError:
            await proc.wait()
            raise self._exited(member) from None
        probing = asyncio.ensure_future(self._probe_ready(member))
        try:
            # Whichever comes first: the replica's own "loaded" line, or a 200 from
            # /health/ready (servers that print no such line).
            await asyncio.wait({probing, loaded}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            probing.cancel()
        if probing.done() and not probing.cancelled() and probing.exception() is not None:
            raise probing.exception()  # type: ignore[misc]
        if not (loaded.done() and not loaded.cancelled()) and not (
                probing.done() and not probing.cancelled()):
            await proc.wait()
            raise self._exited(member)

    async def _probe_ready(self, member: _Member) -> None:
        proc = member.proc
        assert proc is not None
        probe = f"{member.url}/health/ready"
        session = self._http()
        # A bounded poll on a condition, for replicas that announce nothing when loaded.
        interval = READY_POLL_FIRST_S
        while True:
            if proc.returncode is not None:
                raise self._exited(member)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(probe) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(interval)
            interval = min(interval * 2, READY_POLL_MAX_S)

    def _stop_member(self, group: _Group, member: _Member) -> asyncio.Task[None]:
        """Stop one replica in the background; the task ends once it is gone."""
        if member.stopping:
            existing = next((t for t in self._stops if t.get_name() == member.id), None)
            if existing is not None:
                return existing
        member.stopping = True
        task = asyncio.create_task(self._stop(group, member), name=member.id)
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)
        return task

    async def _stop(self, group: _Group, member: _Member) -> None:
        was_ready = member.state == READY
        if member.task is not None and not member.task.done() and not was_ready:
            member.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await member.task
        await self._kill(member, was_ready)
        await self._cleanup(member)
        group.members.pop(member.id, None)
        member.state = STOPPED
        self._emit(member)
        if member.task is not None and not member.task.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await member.task

    async def _kill(self, member: _Member, was_ready: bool) -> None:
        proc = member.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            grace = self.options.stop_grace_s if was_ready else min(
                self.options.stop_grace_s, UNREADY_STOP_GRACE_S)
            try:
                await asyncio.wait_for(proc.wait(), timeout=grace)
            except TimeoutError:
                log.warning("replica %s did not stop within %.0f s; killing it", member.id,
                            grace)
        # Children of the replica live in its session; make sure none is left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()

    async def _cleanup(self, member: _Member) -> None:
        """After the process is gone: its output reader, then its own pulls."""
        if member.proc is not None and member.proc.returncode is None:
            await self._kill(member, False)
        if member.reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(member.reader, timeout=1.0)
        prepared, member.prepared = member.prepared, None
        if prepared is not None and self.delivery is not None:
            try:
                await self.delivery.release(prepared)
            except Exception as e:
                log.error("releasing the pulls of replica %s failed: %s", member.id, e)


def _die_with_parent() -> None:
    """In the child, before exec: be killed if the control server dies without stopping us.

    Replicas run in their own session (so one can be stopped with its children), which
    also takes them out of reach of a signal to the server's process group; without this
    a crashed or SIGKILLed server would leave orphaned replicas holding GPUs.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
