"""The live control plane: replicas per deployment, in-flight counts, queues, scaling.

The store says what should exist (deployments, their settings, who serves which
environment); the controller makes it so and keeps the state that does not survive a
restart: each deployment's replicas (starting, ready, draining), its in-flight count and
request queue, the autoscaler's samples and memory. Every ``tick_interval_s`` it samples
each deployment's in-flight count, asks the pure policy (``control.autoscaler.decide``)
for a replica count, and reconciles the backend towards it. The router calls
:meth:`Controller.acquire` for a replica; when none is ready the request waits, bounded
in time here and in number by the router (``max_queue``), and the deployment is
evaluated at once so a scaled-to-zero deployment starts a replica without waiting for
the next tick.

Promotions: a plain one warms the candidate up and then swaps the environment to it.
A rolling one (the environment's ``promotion_settings.rolling_deploy``) is executed here
as a persisted state machine around the pure planner (``control.rollout.plan``): every
tick, and whenever a replica of either deployment changes, the planner gets the ready
counts and answers both deployments' replica targets and the candidate's traffic share.
Its state is written to the store before the targets are applied, so a restarted control
plane continues from the step it was at. While a rolling promotion runs, both
deployments' replica counts are *pinned* to the planner's targets (autoscaling is off
for them, as documented, until SUCCEEDED, FAILED or CANCELED); the router splits the
environment's requests by the planner's share (``control.traffic.pick_by_count``).

Time: the policy runs on a clock of ``time.monotonic() * time_scale``. In production
``time_scale`` is 1; tests and demos raise it so a documented minimum (an autoscaling
window of at least 10 s) takes a fraction of that in wall time, without weakening the
API's validation. Queue timeouts and backend timeouts stay in wall seconds. Rolling
promotions run on ``time.time() * time_scale`` instead: their persisted times must mean
the same after a restart (stabilization_time_seconds scales like the autoscaler's).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from bdn.errors import BdnError
from control.autoscaler import Decision, Sample, ScalerState, decide
from control.backends import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    ColdStartRecord,
    Replica,
    ReplicaBackend,
    ReplicaSpec,
    ReplicaStatus,
)
from control.errors import (
    BackendError,
    ConflictError,
    NotFoundError,
    RequestError,
    UnavailableError,
)
from control.metrics import Labels, Metrics
from control.promotion_settings import (
    CLEANUP_DEACTIVATE,
    CLEANUP_KEEP,
    CLEANUP_SCALE_TO_ZERO,
    CLEANUP_STRATEGIES,
)
from control.rollout import (
    TERMINAL,
    Action,
    Observed,
    Plan,
    RolloutState,
    RolloutStateError,
    Status,
    action_answer_json,
    apply_action,
    check_action,
    non_rolling_outcome,
    plan,
    start,
)
from control.settings import AutoscalingSettings
from control.store import (
    DeploymentRecord,
    EnvironmentRecord,
    Store,
)

log = logging.getLogger(__name__)

DEFAULT_TICK_INTERVAL_S = 1.0
DEFAULT_QUEUE_TIMEOUT_S = 600.0
DEFAULT_MAX_QUEUE = 1000
DEFAULT_DRAIN_TIMEOUT_S = 60.0
# A promotion gives up after this many failed replica starts in a row.
PROMOTION_MAX_START_FAILURES = 3


@dataclass(frozen=True)
class ControllerOptions:
    """How the controller runs; validated on construction."""

    tick_interval_s: float = DEFAULT_TICK_INTERVAL_S
    # The autoscaler's clock runs this many times faster than wall time (tests, demos).
    time_scale: float = 1.0
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    max_queue: int = DEFAULT_MAX_QUEUE
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("tick_interval_s", "time_scale", "queue_timeout_s"):
            if not getattr(self, name) > 0:
                raise RequestError(f"must be positive, got {getattr(self, name)!r}", field=name)
        if self.max_queue < 1:
            raise RequestError(f"must be at least 1, got {self.max_queue}", field="max_queue")
        if self.drain_timeout_s < 0:
            raise RequestError("must not be negative", field="drain_timeout_s")


@dataclass
class Runtime:
    """The live state of one deployment."""

    record: DeploymentRecord
    ready: list[Replica] = field(default_factory=list)
    # Replicas the backend reports as starting, by id.
    starting: dict[str, ReplicaStatus] = field(default_factory=dict)
    draining: set[asyncio.Task[None]] = field(default_factory=set)
    # Replicas of the current revision drained but not yet retired: the backend keeps
    # them running (and counted) until the controller retires them.
    held: dict[str, Replica] = field(default_factory=dict)
    # A promotion keeps at least this many replicas, whatever min_replica says: a
    # candidate must show it can serve before it takes an environment.
    floor: int = 0
    # A rolling promotion's replica target: while set, it is the count, and the
    # autoscaler only records samples (autoscaling is frozen, as documented).
    pinned: int | None = None
    in_flight: int = 0
    queued: int = 0
    # Requests the router holds that are not in flight yet (body still arriving, or no
    # replica taken); bounded by ``max_queue``, counted by the router.
    waiting: int = 0
    samples: deque[Sample] = field(default_factory=deque)
    scaler: ScalerState = field(default_factory=ScalerState)
    last_decision: Decision | None = None
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    # Wakes anyone watching this deployment's replicas (promotions, drains).
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    failures: int = 0
    last_error: str | None = None
    cold_starts_s: list[float] = field(default_factory=list)
    last_cold_start: ColdStartRecord | None = None
    rr: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def desired(self) -> int:
        if not self.record.active:
            return 0
        if self.pinned is not None:
            return self.pinned
        return max(self.scaler.replicas, self.floor)

    def labels(self) -> Labels:
        return (("model_id", self.record.model_id), ("deployment_id", self.record.id))

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass
class Promotion:
    """One environment's promotion: the one in progress, or the last one (kept in memory
    so the environment still shows how it ended, until the next one starts)."""

    model_id: str
    env_name: str
    deployment_id: str
    previous_id: str | None = None
    # What happens to the previous deployment after success (promotion_cleanup_strategy).
    cleanup: str = CLEANUP_SCALE_TO_ZERO
    # The planner's state: set for a rolling promotion only.
    state: RolloutState | None = None
    plan: Plan | None = None
    status: Status = Status.RELEASING
    error: str | None = None
    # Sequence numbers of the environment's requests while traffic is split.
    counter: itertools.count[int] = field(default_factory=itertools.count)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def rolling(self) -> bool:
        return self.state is not None

    @property
    def in_progress(self) -> bool:
        return self.status not in TERMINAL

    @property
    def deployment_ids(self) -> tuple[str, ...]:
        return tuple(d for d in (self.deployment_id, self.previous_id) if d is not None)

    def share_new(self) -> Fraction | None:
        """The candidate's share of the environment's requests while they are split."""
        if self.plan is None or not self.in_progress:
            return None
        return self.plan.share_new

    def record(self) -> dict[str, Any]:
        """What the store keeps of it, so a restart can continue it."""
        return {"rolling": self.rolling, "previous_deployment_id": self.previous_id,
                "cleanup": self.cleanup,
                "state": self.state.to_json() if self.state is not None else None}


class Controller:
    def __init__(self, store: Store, backend: ReplicaBackend, metrics: Metrics | None = None,
                 options: ControllerOptions | None = None) -> None:
        self.store = store
        self.backend = backend
        self.metrics = metrics or Metrics()
        self.options = options or ControllerOptions()
        self.runtimes: dict[str, Runtime] = {}
        self.promotions: dict[tuple[str, str], Promotion] = {}
        self._promotion_tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        # Drains waiting for the backend to report their replica gone, by replica id.
        self._gone: dict[str, asyncio.Future[None]] = {}
        self._applies: set[asyncio.Task[None]] = set()
        # Builds the spec of a deployment's replicas (the API adds pushed models' parts).
        self.spec_of = default_spec
        # Values of the secrets a pushed config declares (control.push.Pushes.secret_env).
        self.secret_env: Any = None
        backend.subscribe(self._on_replica)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        # A cluster backend connects and lists what already runs before anything is
        # adopted (control.kube.KubernetesBackend.start).
        if hasattr(self.backend, "start"):
            await self.backend.start()
        for rec in self.store.list_deployments():
            self.runtimes[rec.id] = self._adopting(rec)
        # Adopt what the backend already runs (a cluster backend's pods survive a
        # restart of the control plane; local processes do not).
        for rec in self.store.list_deployments():
            for status in self.backend.observe(rec.id):
                self._on_replica(status)
        # What runs for a deployment the store no longer has is an orphan: remove it.
        if hasattr(self.backend, "prune"):
            await self.backend.prune({r.id for r in self.store.list_deployments()})
        for env in self.store.promotions_in_progress():
            self._resume_promotion(env)
        self.tick()
        self._loop_task = asyncio.create_task(self._loop())

    def _adopting(self, rec: DeploymentRecord) -> Runtime:
        """A deployment's runtime at start: the autoscaler begins from the replica count
        the backend already runs (a restart is not a reason to scale down at once; the
        scale-down delay applies as usual)."""
        rt = Runtime(rec)
        adopted = getattr(self.backend, "adopted", None)
        count = adopted().get(rec.id, 0) if adopted is not None else 0
        if rec.active and count:
            rt.scaler = ScalerState(replicas=min(count, rec.settings.max_replica))
        return rt

    async def close(self) -> None:
        self._closing = True
        tasks = [t for t in (self._loop_task, *self._promotion_tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        drains = []
        for rt in self.runtimes.values():
            self._fail_waiters(rt, UnavailableError("the control server is shutting down",
                                                    deployment_id=rt.record.id))
            drains += list(rt.draining)
            rt.ready = []
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, *self._applies, return_exceptions=True)
        await self.backend.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.tick_interval_s)
            try:
                self.tick()
            except Exception:  # one bad tick must not stop autoscaling for good
                log.exception("autoscaler tick failed")

    def now_s(self) -> float:
        return time.monotonic() * self.options.time_scale

    def wall_s(self) -> float:
        """The rollout planner's clock: wall time, so persisted times survive a restart."""
        return time.time() * self.options.time_scale

    # -- scaling -----------------------------------------------------------------------

    def tick(self) -> None:
        for rt in list(self.runtimes.values()):
            self.evaluate(rt)

    def evaluate(self, rt: Runtime) -> Decision | None:
        """Sample the deployment's load, decide its replica count, reconcile towards it."""
        now = self.now_s()
        settings = rt.record.settings
        rt.samples.append(Sample(now, float(rt.in_flight)))
        # Keep one sample older than the window: it bounds the first interval inside it.
        horizon = now - settings.autoscaling_window
        while len(rt.samples) > 1 and rt.samples[1].at_s <= horizon:
            rt.samples.popleft()
        if rt.pinned is not None:
            # A rolling promotion owns the count; the samples are kept so autoscaling
            # resumes with the load it missed.
            self._reconcile(rt)
            return None
        decision = decide(settings, rt.samples, rt.scaler, now)
        if decision.replicas != rt.scaler.replicas:
            log.info("deployment %s: %d -> %d replicas (%s; average in-flight %.2f)",
                     rt.record.id, rt.scaler.replicas, decision.replicas, decision.reason,
                     decision.average_in_flight)
        rt.scaler = decision.state
        rt.last_decision = decision
        self._reconcile(rt)
        return decision

    def _reconcile(self, rt: Runtime) -> None:
        """Tell the backend how many replicas the deployment should have now.

        Ready replicas leave through a drain (no new requests; the running ones finish),
        and only then are they retired, so the backend is told to keep them until then.
        """
        if self._closing or rt.record.id not in self.runtimes:
            return
        # Replicas of an older revision (a re-pushed development deployment) go at once.
        for replica in [r for r in rt.ready if r.spec.revision != rt.record.revision]:
            self._drain(rt, replica)
        want = rt.desired
        excess = len(rt.ready) + len(rt.starting) - want
        if excess > len(rt.starting):
            # The backend stops starting replicas first; ready ones are drained here.
            for replica in sorted(rt.ready, key=lambda r: r.in_flight)[
                    :excess - len(rt.starting)]:
                self._drain(rt, replica)
        self._apply(rt)

    def _apply(self, rt: Runtime, retire: tuple[str, ...] = ()) -> asyncio.Task[None]:
        spec = self.spec_of(self, rt.record)
        target = rt.desired + len(rt.held)
        task = asyncio.create_task(self._apply_now(rt, spec, target, retire))
        self._applies.add(task)
        task.add_done_callback(self._applies.discard)
        return task

    async def _apply_now(self, rt: Runtime, spec: ReplicaSpec, target: int,
                         retire: tuple[str, ...]) -> None:
        try:
            await self.backend.apply(spec, target, retire)
        except Exception as e:
            rt.last_error = f"the {self.backend.name} backend refused the change: {e}"
            log.error("deployment %s: %s", rt.record.id, rt.last_error)
            if not rt.ready and not rt.starting:
                self._fail_waiters(rt, UnavailableError(rt.last_error,
                                                        deployment_id=rt.record.id))

    def _on_replica(self, status: ReplicaStatus) -> None:
        """The backend observed a change of one replica (called on the event loop)."""
        if status.state in (STOPPED, FAILED):
            gone = self._gone.pop(status.id, None)
            if gone is not None and not gone.done():
                gone.set_result(None)
        rt = self.runtimes.get(status.deployment_id)
        if rt is None:
            return
        if status.state == STARTING:
            rt.starting[status.id] = status
        elif status.state == READY:
            rt.starting.pop(status.id, None)
            self._ready(rt, status)
        elif status.state == FAILED:
            rt.starting.pop(status.id, None)
            rt.failures += 1
            rt.last_error = status.error
            self.metrics.replica_starts.inc((*rt.labels(), ("outcome", "failed")))
            if not rt.starting and not rt.ready:
                self._fail_waiters(rt, UnavailableError(
                    f"no replica of deployment {rt.record.id} could start: {status.error}",
                    deployment_id=rt.record.id))
        elif status.state == STOPPED:
            rt.starting.pop(status.id, None)
            rt.held.pop(status.id, None)
            lost = next((r for r in rt.ready if r.id == status.id), None)
            if lost is not None:
                # Not drained by us: it exited or the backend lost it.
                rt.ready.remove(lost)
                rt.last_error = status.error or f"replica {status.id} stopped"
                log.error("deployment %s: %s", rt.record.id, rt.last_error)
        rt.notify()
        for promo in self.promotions.values():
            if promo.rolling and promo.in_progress and rt.record.id in promo.deployment_ids:
                promo.wake.set()

    def _ready(self, rt: Runtime, status: ReplicaStatus) -> None:
        if self._closing:
            return
        now = time.monotonic()
        record = status.cold_start or ColdStartRecord()
        total = record.phases.get("total", 0.0)
        spec = dataclasses.replace(self.spec_of(self, rt.record), revision=status.revision)
        replica = Replica(id=status.id, spec=spec, url=status.url, started_at_s=now - total,
                          ready_at_s=now, pid=status.pid, ready=True, cold_start=record)
        replica.output.extend(status.output)
        rt.failures = 0
        rt.last_error = None
        rt.ready.append(replica)
        rt.cold_starts_s.append(replica.cold_start_s)
        rt.last_cold_start = record
        self.metrics.observe_cold_start(rt.labels(), replica.cold_start_s, record)
        self.metrics.replica_starts.inc((*rt.labels(), ("outcome", "ready")))
        waiters, rt.waiters = rt.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        # The desired count may have dropped while this replica was starting.
        self._reconcile(rt)

    def _drain(self, rt: Runtime, replica: Replica) -> None:
        """Stop routing to ``replica``, let its in-flight requests finish, retire it."""
        if replica in rt.ready:
            rt.ready.remove(replica)
        replica.draining = True
        if replica.spec.revision == rt.record.revision:
            rt.held[replica.id] = replica
        task = asyncio.create_task(self._drain_then_stop(rt, replica))
        rt.draining.add(task)
        task.add_done_callback(rt.draining.discard)
        rt.notify()

    async def _drain_then_stop(self, rt: Runtime, replica: Replica) -> None:
        deadline = time.monotonic() + self.options.drain_timeout_s
        while replica.in_flight > 0 and time.monotonic() < deadline:
            changed = rt.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), deadline - time.monotonic())
        rt.held.pop(replica.id, None)
        if rt.record.id not in self.runtimes:
            return  # deleted: the backend's remove() stops every replica of it
        gone = self._gone.setdefault(replica.id,
                                     asyncio.get_running_loop().create_future())
        await self._apply(rt, retire=(replica.id,))
        await gone
        log.info("replica %s of deployment %s stopped", replica.id, rt.record.id)

    # -- routing -----------------------------------------------------------------------

    async def acquire(self, rt: Runtime) -> tuple[Replica, float]:
        """The least-loaded ready replica, waiting (bounded) for one if none is ready.

        Returns the replica (its in-flight count already raised) and the seconds waited.
        The caller must call :meth:`release` when the response is complete.
        """
        waited_from = time.monotonic()
        deadline = waited_from + self.options.queue_timeout_s
        queued = False
        try:
            while True:
                if not rt.record.active:
                    raise inactive_error(rt.record)
                if rt.record.id not in self.runtimes:
                    raise NotFoundError(f"deployment {rt.record.id} was deleted",
                                        kind="deployment", ident=rt.record.id)
                if rt.ready:
                    least = min(r.in_flight for r in rt.ready)
                    # Round-robin among the least loaded, so ties do not pile on one.
                    tied = [r for r in rt.ready if r.in_flight == least]
                    replica = tied[next(rt.rr) % len(tied)]
                    replica.in_flight += 1
                    return replica, time.monotonic() - waited_from
                if not queued:
                    # The bound (max_queue) is the router's, on every request it holds.
                    queued = True
                    rt.queued += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UnavailableError(
                        f"no replica of deployment {rt.record.id} became ready within "
                        f"{self.options.queue_timeout_s:g} s"
                        + (f" (last error: {rt.last_error})" if rt.last_error else ""),
                        deployment_id=rt.record.id)
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                rt.waiters.append(waiter)
                if not rt.starting:
                    # Ask for a replica now rather than at the next tick.
                    self.evaluate(rt)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), remaining)
                if waiter.done() and waiter.exception() is not None:
                    raise waiter.exception()  # type: ignore[misc]
        finally:
            if queued:
                rt.queued -= 1

    def replica_unreachable(self, rt: Runtime, replica: Replica, reason: str) -> None:
        """The router could not connect to ``replica``: stop routing to it, replace it."""
        if replica in rt.ready:
            rt.last_error = f"replica {replica.id} became unreachable: {reason}"
            log.error("%s", rt.last_error)
            self._drain(rt, replica)
            self._reconcile(rt)

    def release(self, rt: Runtime, replica: Replica) -> None:
        replica.in_flight -= 1
        if replica.draining and replica.in_flight == 0:
            rt.notify()

    def _fail_waiters(self, rt: Runtime, error: Exception) -> None:
        waiters, rt.waiters = rt.waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(error)
                # Read it here so an abandoned waiter does not log "never retrieved".
                w.exception()

    # -- management operations ---------------------------------------------------------

    def runtime(self, deployment_id: str) -> Runtime:
        rt = self.runtimes.get(deployment_id)
        if rt is None:
            raise NotFoundError(f"deployment {deployment_id!r} not found", kind="deployment",
                                ident=deployment_id)
        return rt

    def refresh(self, deployment_id: str) -> Runtime:
        """Re-read a deployment from the store after it changed, and act on it."""
        rec = next(d for d in self.store.list_deployments() if d.id == deployment_id)
        rt = self.runtimes.get(deployment_id)
        if rt is None:
            rt = self.runtimes[deployment_id] = Runtime(rec)
        else:
            rt.record = rec
        if not rec.active:
            # Inactive means no replicas and no memory of past load: activating again
            # starts from min_replica, not from the traffic before the deactivation.
            rt.scaler = ScalerState()
            rt.samples.clear()
            self._fail_waiters(rt, inactive_error(rec))
        self.evaluate(rt)
        return rt

    def push(self, model_id: str, model_dir: str, *, name: str | None, development: bool,
             settings: AutoscalingSettings | None,
             push: dict[str, Any] | None = None) -> DeploymentRecord:
        rec = self.store.create_deployment(model_id, model_dir, name=name,
                                           development=development, settings=settings,
                                           push=push)
        self.refresh(rec.id)
        return rec

    def update_settings(self, model_id: str, deployment_id: str,
                        patch: Mapping[str, Any]) -> tuple[str, DeploymentRecord]:
        rec = self.store.get_deployment(model_id, deployment_id)
        if rec.is_development:
            for key in ("min_replica", "max_replica"):
                if patch.get(key) is not None and patch[key] != getattr(rec.settings, key):
                    raise RequestError(
                        "is fixed for the development deployment (min 0, max 1); publish a "
                        "deployment to change it", field=key)
        new = rec.settings.patched(patch)
        if new == rec.settings:
            return "UNCHANGED", rec
        self.store.set_deployment_settings(rec.id, new)
        rt = self.refresh(rec.id)
        return "ACCEPTED", rt.record

    def update_environment_settings(self, model_id: str, env_name: str,
                                    patch: Mapping[str, Any]) -> EnvironmentRecord:
        env = self.store.get_environment(model_id, env_name)
        env = self.store.set_environment_settings(model_id, env_name,
                                                  env.settings.patched(patch))
        if env.current_deployment_id is not None:
            self.refresh(env.current_deployment_id)
        return env

    def rename(self, model_id: str, deployment_id: str, name: object) -> DeploymentRecord:
        rec = self.store.rename_deployment(model_id, deployment_id, name)
        rt = self.runtimes.get(rec.id)
        if rt is not None:
            rt.record = rec
        return rec

    def set_active(self, model_id: str, deployment_id: str, active: bool) -> DeploymentRecord:
        self.store.get_deployment(model_id, deployment_id)
        self.store.set_active(deployment_id, active)
        return self.refresh(deployment_id).record

    async def delete_deployment(self, model_id: str, deployment_id: str) -> None:
        self.store.delete_deployment(model_id, deployment_id)
        rt = self.runtimes.pop(deployment_id, None)
        if rt is not None:
            await self._retire(rt, NotFoundError(f"deployment {deployment_id} was deleted",
                                                 kind="deployment", ident=deployment_id))

    async def delete_model(self, model_id: str) -> None:
        self.store.get_model(model_id)
        doomed = [d.id for d in self.store.list_deployments(model_id)]
        self.store.delete_model(model_id)
        for key in [k for k in self.promotions if k[0] == model_id]:
            self.forget_promotion(*key, hand_back=False)  # its deployments go too
        for dep_id in doomed:
            rt = self.runtimes.pop(dep_id, None)
            if rt is not None:
                await self._retire(rt, NotFoundError(f"model {model_id} was deleted",
                                                     kind="model", ident=model_id))

    async def _retire(self, rt: Runtime, error: Exception) -> None:
        self._fail_waiters(rt, error)
        for replica in list(rt.ready):
            self._drain(rt, replica)
        await asyncio.gather(*rt.draining, return_exceptions=True)
        await self.backend.remove(rt.record.id)

    # -- promotion ---------------------------------------------------------------------

    def promote(self, model_id: str, env_name: str, deployment_id: str, *,
                scale_down_previous: bool = True) -> DeploymentRecord:
        """Start promoting a deployment to an environment; returns the candidate.

        The candidate inherits the environment's autoscaling settings. A plain promotion
        warms it up to its ``min_replica`` before traffic moves; then the previous
        deployment is cleaned up (``promotion_cleanup_strategy``; by default scaled to
        zero at once). With ``rolling_deploy`` on and a deployment already serving, the
        environment moves step by step (see the module docstring). Promoting the
        development deployment first publishes a copy of it, as the seed documents ("a
        new deployment is created with a unique deployment ID"); an inactive published
        deployment must be activated first, as documented.
        """
        rec = self.store.get_deployment(model_id, deployment_id)
        env = self.store.get_environment(model_id, env_name)
        key = (model_id, env_name)
        running = self.promotions.get(key)
        if running is not None and running.in_progress:
            raise ConflictError(
                f"a promotion of deployment {running.deployment_id} to {env_name!r} is "
                "already in progress; wait for it to finish, or cancel it with POST "
                f"/v1/models/{model_id}/environments/{env_name}/cancel_promotion",
                ident=env_name)
        if not rec.active and not rec.is_development:
            raise ConflictError(
                f"deployment {rec.id} ({rec.name}) is inactive; activate it first with POST "
                f"/v1/models/{model_id}/deployments/{rec.id}/activate, then promote it",
                ident=rec.id)
        if env.current_deployment_id == rec.id:
            raise ConflictError(f"deployment {rec.id} already serves {env_name!r}",
                                ident=rec.id)
        if rec.is_development:
            rec = self.store.create_deployment(model_id, rec.model_dir,
                                               settings=rec.settings, push=rec.push)
        previous = env.current_deployment_id
        cleanup = env.promotion_settings.promotion_cleanup_strategy
        promo = Promotion(model_id, env_name, rec.id, previous_id=previous,
                          cleanup=cleanup if scale_down_previous else CLEANUP_KEEP)
        if (env.promotion_settings.rolling_deploy and previous is not None
                and previous in self.runtimes):
            prev_rt = self.runtimes[previous]
            promo.state = start(env.promotion_settings,
                                max(prev_rt.desired, env.settings.min_replica), self.wall_s())
            if not scale_down_previous:
                promo.state = dataclasses.replace(promo.state, cleanup=CLEANUP_KEEP)
        self.store.begin_promotion(model_id, env_name, rec.id, promo.record())
        self._spawn_promotion(promo)
        return self.store.get_deployment(model_id, rec.id)

    def _resume_promotion(self, env: EnvironmentRecord) -> None:
        """Continue a promotion the store says was in progress when the server stopped."""
        assert env.promoting_deployment_id is not None
        saved = env.promotion or {}
        cleanup = saved.get("cleanup")
        promo = Promotion(env.model_id, env.name, env.promoting_deployment_id,
                          previous_id=saved.get("previous_deployment_id",
                                                env.current_deployment_id),
                          cleanup=cleanup if cleanup in CLEANUP_STRATEGIES
                          else CLEANUP_SCALE_TO_ZERO)
        if saved.get("rolling"):
            try:
                promo.state = RolloutState.from_json(saved.get("state"))
            except RolloutStateError as e:
                log.error("the rolling promotion of %s to %s cannot continue: %s",
                          promo.deployment_id, env.name, e)
                self.promotions[(env.model_id, env.name)] = promo
                self.store.abort_promotion(env.model_id, env.name)
                promo.status, promo.error = Status.FAILED, f"its saved state is unusable: {e}"
                if (promo.deployment_id in self.runtimes
                        and not self.store.environments_of(promo.deployment_id)):
                    self.demote(promo.deployment_id)
                return
        self._spawn_promotion(promo)

    def _spawn_promotion(self, promo: Promotion) -> None:
        self.promotions[(promo.model_id, promo.env_name)] = promo
        if promo.rolling:
            # Pin both deployments before anything evaluates them: the autoscaler must
            # not start (or stop) replicas the planner has not asked for.
            for dep_id in promo.deployment_ids:
                rt = self.runtimes.get(dep_id)
                if rt is None and dep_id == promo.deployment_id:
                    rec = self.store.get_deployment(promo.model_id, dep_id)
                    rt = self.runtimes[dep_id] = Runtime(rec)
                if rt is not None and rt.pinned is None:
                    rt.pinned = rt.desired
            self.refresh(promo.deployment_id)
            self._step_rolling(promo)
            run = self._run_rolling(promo)
        else:
            run = self._run_promotion(promo)
        task = asyncio.create_task(run)
        promo.task = task
        self._promotion_tasks.add(task)
        task.add_done_callback(self._promotion_tasks.discard)

    async def _run_promotion(self, promo: Promotion) -> None:
        deployment_id = promo.deployment_id
        existing = self.runtimes.get(deployment_id)
        if existing is not None:
            existing.floor = 1  # before refresh() evaluates it
        try:
            rt = self.refresh(deployment_id)
            if rt.floor < 1:
                rt.floor = 1
                self._reconcile(rt)
            # At least one replica must be ready, even at min_replica 0: traffic never
            # moves to a deployment that has not shown it can serve.
            while len(rt.ready) < max(1, rt.record.settings.min_replica):
                if rt.failures >= PROMOTION_MAX_START_FAILURES:
                    raise BackendError(f"deployment {deployment_id} did not become ready: "
                                       f"{rt.last_error}")
                if deployment_id not in self.runtimes or not rt.record.active:
                    raise ConflictError(f"deployment {deployment_id} was deleted or "
                                        "deactivated during its promotion",
                                        ident=deployment_id)
                changed = rt.changed
                # Also re-evaluate now and then: a start that failed is retried by a tick.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.options.tick_interval_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._end_plain(promo, Status.FAILED, str(e))
            return
        self._end_plain(promo, Status.SUCCEEDED)

    def _end_plain(self, promo: Promotion, outcome: Status, error: str | None = None) -> None:
        """End a promotion that is not rolling (it ran to its end, or an action ended it)."""
        cand = self.runtimes.get(promo.deployment_id)
        if cand is not None:
            cand.floor = 0
        promo.status, promo.error = outcome, error
        if outcome is Status.SUCCEEDED:
            self.store.finish_promotion(promo.model_id, promo.env_name)
            log.info("deployment %s now serves %s of model %s (previous: %s)",
                     promo.deployment_id, promo.env_name, promo.model_id, promo.previous_id)
            self._clean_up_previous(promo)
            return
        self.store.abort_promotion(promo.model_id, promo.env_name)
        log.error("promotion of %s to %s ended %s%s", promo.deployment_id, promo.env_name,
                  outcome.value, f": {error}" if error else "")
        # The candidate inherited the environment's min_replica; without the promotion it
        # should not keep (re)starting replicas.
        if cand is not None and not self.store.environments_of(promo.deployment_id):
            self.demote(promo.deployment_id)

    def _clean_up_previous(self, promo: Promotion) -> None:
        """After success: the documented promotion_cleanup_strategy, for a previous
        deployment that no other environment uses."""
        previous = promo.previous_id
        if (previous is None or previous == promo.deployment_id
                or previous not in self.runtimes or self.store.environments_of(previous)):
            return
        if promo.cleanup == CLEANUP_SCALE_TO_ZERO:
            self.demote(previous)
        elif promo.cleanup == CLEANUP_DEACTIVATE:
            self.set_active(promo.model_id, previous, False)
        else:  # KEEP: it keeps its settings and replicas; autoscaling takes it from here
            self._reconcile(self.runtimes[previous])

    # -- rolling promotion -------------------------------------------------------------

    async def _run_rolling(self, promo: Promotion) -> None:
        try:
            while promo.in_progress:
                promo.wake.clear()
                # Woken by a replica change of either deployment or an action; the
                # timeout is the tick that lets time-based steps (stabilization) pass.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(promo.wake.wait(), self.options.tick_interval_s)
                self._step_rolling(promo)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not leave both deployments frozen for good
            log.exception("rolling promotion of %s to %s failed", promo.deployment_id,
                          promo.env_name)
            if promo.in_progress and promo.state is not None:
                self._adopt(promo, plan(apply_action(promo.state, Action.FORCE_CANCEL,
                                                     self.wall_s()),
                                        self._observe(promo), self.wall_s()),
                            error=f"the executor failed: {e}")

    def _observe(self, promo: Promotion) -> Observed:
        prev = self.runtimes.get(promo.previous_id or "")
        cand = self.runtimes.get(promo.deployment_id)
        failed = (cand is None or not cand.record.active
                  or cand.failures >= PROMOTION_MAX_START_FAILURES)
        return Observed(len(prev.ready) if prev else 0, len(cand.ready) if cand else 0,
                        candidate_failed=failed)

    def _step_rolling(self, promo: Promotion, action: Action = Action.NONE) -> Plan | None:
        """One planner call with what is observed now; its targets applied at once."""
        if not promo.in_progress or promo.state is None:
            return None
        observed = self._observe(promo)
        result = plan(promo.state, observed, self.wall_s(), action)
        self._adopt(promo, result)
        return result

    def _adopt(self, promo: Promotion, result: Plan, error: str | None = None) -> None:
        """Persist a plan's state (before acting on it), then apply its targets."""
        assert promo.state is not None
        changed = result.state != promo.state
        if result.status != promo.status or (promo.plan is not None and result.share_new
                                             != promo.plan.share_new):
            log.info("rolling promotion of %s to %s: %s, %s %% of traffic to it (%s)",
                     promo.deployment_id, promo.env_name, result.status.value,
                     result.percent_traffic_to_new_version, result.reason)
        promo.state, promo.plan, promo.status = result.state, result, result.status
        if result.status in TERMINAL:
            self._end_rolling(promo, result, error)
            return
        if changed:
            self.store.set_promotion(promo.model_id, promo.env_name, promo.deployment_id,
                                     promo.record())
        for dep_id, target in ((promo.previous_id, result.previous_replicas),
                               (promo.deployment_id, result.candidate_replicas)):
            rt = self.runtimes.get(dep_id or "")
            if rt is not None:
                rt.pinned = target
                self._reconcile(rt)

    def _end_rolling(self, promo: Promotion, result: Plan, error: str | None) -> None:
        """Terminal status: autoscaling resumes from the planner's final targets."""
        for dep_id, target in ((promo.previous_id, result.previous_replicas),
                               (promo.deployment_id, result.candidate_replicas)):
            rt = self.runtimes.get(dep_id or "")
            if rt is not None:
                rt.pinned = None
                rt.scaler = ScalerState(replicas=target)
        if result.status is Status.FAILED:
            error = error or result.state.reason
        promo.error = error
        # The planner decided the cleanup when the promotion started.
        promo.cleanup = result.state.cleanup
        self._end_plain(promo, result.status, error)
        for dep_id in promo.deployment_ids:
            if dep_id in self.runtimes:
                self._reconcile(self.runtimes[dep_id])

    # -- promotion actions -------------------------------------------------------------

    def promotion_action(self, model_id: str, env_name: str, action: Action) -> dict[str, Any]:
        """``POST .../environments/{env}/{action}_promotion``: the documented answer."""
        self.store.get_environment(model_id, env_name)
        promo = self.promotions.get((model_id, env_name))
        if promo is None or not promo.in_progress:
            check_action(promo.status if promo is not None else None, action,
                         rolling=promo is not None and promo.rolling, env_name=env_name)
            raise AssertionError("check_action refuses an action without a promotion")
        if promo.state is not None:
            state = apply_action(promo.state, action, self.wall_s(), env_name=env_name)
            answer = action_answer_json(state.status, pause_requested=state.pause_requested)
            log.info("rolling promotion of %s to %s: %s requested", promo.deployment_id,
                     env_name, action.value)
            promo.state = state
            self.store.set_promotion(model_id, env_name, promo.deployment_id, promo.record())
            # Act now rather than at the next tick: what the answer says has happened has.
            if promo.plan is not None:
                self._adopt(promo, plan(state, self._observe(promo), self.wall_s()))
            promo.wake.set()
            return answer
        check_action(promo.status, action, rolling=False, env_name=env_name)
        outcome = non_rolling_outcome(action)
        if promo.task is not None:
            promo.task.cancel()
        self._end_plain(promo, outcome, None if outcome is Status.SUCCEEDED
                        else f"{action.path} requested")
        return action_answer_json(outcome)

    def forget_promotion(self, model_id: str, env_name: str, *,
                         hand_back: bool = True) -> None:
        """The environment (or its model) was deleted: stop its promotion, if any, and
        hand its deployments back to the autoscaler where they stand."""
        promo = self.promotions.pop((model_id, env_name), None)
        if promo is None:
            return
        if promo.task is not None:
            promo.task.cancel()
        if not promo.in_progress or not hand_back:
            return
        promo.status = Status.CANCELED
        for dep_id in promo.deployment_ids:
            rt = self.runtimes.get(dep_id)
            if rt is None:
                continue
            rt.floor = 0
            if rt.pinned is not None:
                rt.scaler, rt.pinned = ScalerState(replicas=rt.pinned), None
            self._reconcile(rt)
        if (promo.deployment_id in self.runtimes
                and not self.store.environments_of(promo.deployment_id)):
            self.demote(promo.deployment_id)

    def demote(self, deployment_id: str) -> None:
        """Scale a deployment that no longer serves an environment to zero, now."""
        rt = self.runtime(deployment_id)
        settings = dataclasses.replace(rt.record.settings, min_replica=0)
        self.store.set_deployment_settings(deployment_id, settings)
        rt.record = dataclasses.replace(rt.record, settings=settings)
        rt.scaler = ScalerState()
        rt.samples.clear()
        self._reconcile(rt)

    # -- views -------------------------------------------------------------------------

    def status_of(self, rt: Runtime) -> str:
        if not rt.record.active:
            return "INACTIVE"
        if rt.ready:
            return "ACTIVE"
        if rt.last_error and not rt.starting:
            return "UNHEALTHY"
        if rt.starting:
            return "WAKING_UP"
        return "SCALED_TO_ZERO"

    def gauges(self) -> list[tuple[str, str, list[tuple[Labels, float]]]]:
        rts = sorted(self.runtimes.values(), key=lambda r: (r.record.model_id, r.record.id))
        return [
            ("bdn_concurrent_requests", "In-flight requests per deployment (queued included).",
             [(rt.labels(), rt.in_flight) for rt in rts]),
            ("bdn_desired_replicas", "Replicas the autoscaler wants per deployment.",
             [(rt.labels(), rt.desired) for rt in rts]),
            ("bdn_ready_replicas", "Replicas ready to serve per deployment.",
             [(rt.labels(), len(rt.ready)) for rt in rts]),
            ("bdn_starting_replicas", "Replicas cold-starting per deployment.",
             [(rt.labels(), len(rt.starting)) for rt in rts]),
            ("bdn_queue_depth", "Requests waiting for a ready replica per deployment.",
             [(rt.labels(), rt.queued) for rt in rts]),
            ("bdn_waiting_requests", "Requests the router holds that are not in flight "
             "yet (body still arriving, or no ready replica) per deployment; at most "
             "--max-queue.", [(rt.labels(), rt.waiting) for rt in rts]),
            ("bdn_promotion_percent_traffic_to_new_version", "Share of an environment's "
             "requests routed to the candidate of its promotion, in percent.",
             [((("model_id", p.model_id), ("environment", p.env_name)),
               float(p.plan.percent_traffic_to_new_version) if p.plan is not None
               else (100.0 if p.status is Status.SUCCEEDED else 0.0))
              for p in sorted(self.promotions.values(),
                              key=lambda p: (p.model_id, p.env_name))]),
        ]


def default_spec(controller: Controller, rec: DeploymentRecord) -> ReplicaSpec:
    """The spec of a deployment's replicas: its folder, revision and environment."""
    envs = controller.store.environments_of(rec.id)
    environment = envs[0] if envs else next(
        (env for (model_id, env), p in controller.promotions.items()
         if model_id == rec.model_id and p.deployment_id == rec.id
         and p.in_progress), None)
    spec = ReplicaSpec(model_id=rec.model_id, deployment_id=rec.id,
                       deployment_name=rec.name, model_dir=rec.model_dir,
                       revision=rec.revision, environment=environment,
                       resources=resources_of(rec))
    if rec.push is None:
        return spec
    env = [(str(k), str(v)) for k, v in (rec.push.get("environment_variables") or {}).items()]
    if controller.secret_env is not None:
        env += controller.secret_env(rec.push.get("secrets") or ())
    return dataclasses.replace(spec, code=rec.push["code"],
                               weights=tuple(rec.push.get("weights") or ()), env=tuple(env))


def resources_of(rec: DeploymentRecord) -> Mapping[str, Any] | None:
    """config.yaml's ``resources:`` of a deployment: recorded at push, else read from its
    folder (cached by the file's mtime: specs are built on every evaluation)."""
    if rec.push is not None:
        return rec.push.get("resources") or None
    path = os.path.join(rec.model_dir, "config.yaml")
    try:
        mtime_ns = os.stat(path).st_mtime_ns
    except OSError:
        return None
    return _folder_resources(path, mtime_ns)


@functools.lru_cache(maxsize=256)
def _folder_resources(path: str, mtime_ns: int) -> Mapping[str, Any] | None:
    from bdn.config import read_config_document

    try:
        doc = read_config_document(Path(path))
    except (OSError, ValueError, BdnError):
        return None  # the config is validated where it is pushed; a spec does not judge
    resources = doc.get("resources") if isinstance(doc, dict) else None
    return resources if isinstance(resources, dict) and resources else None


def inactive_error(rec: DeploymentRecord) -> NotFoundError:
    return NotFoundError(
        f"deployment {rec.id} ({rec.name}) of model {rec.model_id} is inactive; activate it "
        f"with POST /v1/models/{rec.model_id}/deployments/{rec.id}/activate",
        kind="deployment", ident=rec.id)
