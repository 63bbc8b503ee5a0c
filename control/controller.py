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

Time: the policy runs on a clock of ``time.monotonic() * time_scale``. In production
``time_scale`` is 1; tests and demos raise it so a documented minimum (an autoscaling
window of at least 10 s) takes a fraction of that in wall time, without weakening the
API's validation. Queue timeouts and backend timeouts stay in wall seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from control.autoscaler import Decision, Sample, ScalerState, decide
from control.backends import Replica, ReplicaBackend, ReplicaSpec
from control.errors import (
    BackendError,
    ConflictError,
    NotFoundError,
    RequestError,
    UnavailableError,
)
from control.metrics import Labels, Metrics
from control.settings import AutoscalingSettings
from control.store import (
    DeploymentRecord,
    EnvironmentRecord,
    Store,
    new_id,
)

log = logging.getLogger(__name__)

DEFAULT_TICK_INTERVAL_S = 1.0
DEFAULT_QUEUE_TIMEOUT_S = 600.0
DEFAULT_MAX_QUEUE = 1000
DEFAULT_DRAIN_TIMEOUT_S = 60.0
START_RETRY_BACKOFF_S = 1.0
START_RETRY_BACKOFF_MAX_S = 30.0
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
    start_retry_backoff_s: float = START_RETRY_BACKOFF_S

    def __post_init__(self) -> None:
        for name in ("tick_interval_s", "time_scale", "queue_timeout_s"):
            if not getattr(self, name) > 0:
                raise RequestError(f"must be positive, got {getattr(self, name)!r}", field=name)
        if self.max_queue < 1:
            raise RequestError(f"must be at least 1, got {self.max_queue}", field="max_queue")
        if self.drain_timeout_s < 0 or self.start_retry_backoff_s < 0:
            raise RequestError("must not be negative", field="drain_timeout_s")


@dataclass
class Runtime:
    """The live state of one deployment."""

    record: DeploymentRecord
    ready: list[Replica] = field(default_factory=list)
    starting: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    draining: set[asyncio.Task[None]] = field(default_factory=set)
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
    retry_at: float = 0.0
    last_error: str | None = None
    cold_starts_s: list[float] = field(default_factory=list)
    rr: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def desired(self) -> int:
        return self.scaler.replicas if self.record.active else 0

    def labels(self) -> Labels:
        return (("model_id", self.record.model_id), ("deployment_id", self.record.id))

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass
class PromotionStatus:
    deployment_id: str
    status: str = "IN_PROGRESS"
    error: str | None = None


class Controller:
    def __init__(self, store: Store, backend: ReplicaBackend, metrics: Metrics | None = None,
                 options: ControllerOptions | None = None) -> None:
        self.store = store
        self.backend = backend
        self.metrics = metrics or Metrics()
        self.options = options or ControllerOptions()
        self.runtimes: dict[str, Runtime] = {}
        self.promotions: dict[tuple[str, str], PromotionStatus] = {}
        self._promotion_tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        for rec in self.store.list_deployments():
            self.runtimes[rec.id] = Runtime(rec)
        for env in self.store.promotions_in_progress():
            assert env.promoting_deployment_id is not None
            self._spawn_promotion(env.model_id, env.name, env.promoting_deployment_id, True)
        self.tick()
        self._loop_task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        self._closing = True
        tasks = [t for t in (self._loop_task, *self._promotion_tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        stops = []
        for rt in self.runtimes.values():
            self._fail_waiters(rt, UnavailableError("the control server is shutting down",
                                                    deployment_id=rt.record.id))
            for task in rt.starting.values():
                task.cancel()
            stops += list(rt.starting.values()) + list(rt.draining)
            stops += [self._stop(rt, r) for r in rt.ready]
            rt.ready = []
        await asyncio.gather(*stops, return_exceptions=True)
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

    # -- scaling -----------------------------------------------------------------------

    def tick(self) -> None:
        for rt in list(self.runtimes.values()):
            self._check_alive(rt)
            self.evaluate(rt)

    def evaluate(self, rt: Runtime) -> Decision:
        """Sample the deployment's load, decide its replica count, reconcile towards it."""
        now = self.now_s()
        settings = rt.record.settings
        rt.samples.append(Sample(now, float(rt.in_flight)))
        # Keep one sample older than the window: it bounds the first interval inside it.
        horizon = now - settings.autoscaling_window
        while len(rt.samples) > 1 and rt.samples[1].at_s <= horizon:
            rt.samples.popleft()
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
        if self._closing:
            return
        # Replicas of an older revision (a re-pushed development deployment) go at once.
        for replica in [r for r in rt.ready if r.spec.revision != rt.record.revision]:
            self._drain(rt, replica)
        have = len(rt.ready) + len(rt.starting)
        want = rt.desired
        if have < want and time.monotonic() >= rt.retry_at:
            for _ in range(want - have):
                self._start_replica(rt)
        elif have > want:
            excess = have - want
            for rid in list(rt.starting)[:excess]:
                rt.starting.pop(rid).cancel()
                excess -= 1
            for replica in sorted(rt.ready, key=lambda r: r.in_flight)[:excess]:
                self._drain(rt, replica)

    def _start_replica(self, rt: Runtime) -> None:
        rec = rt.record
        spec = ReplicaSpec(model_id=rec.model_id, deployment_id=rec.id,
                           deployment_name=rec.name, model_dir=rec.model_dir,
                           revision=rec.revision)
        rid = f"{rec.id}-{new_id()[:5]}"
        rt.starting[rid] = asyncio.create_task(self._run_start(rt, spec, rid))

    async def _run_start(self, rt: Runtime, spec: ReplicaSpec, rid: str) -> None:
        try:
            replica = await self.backend.start(spec, rid)
        except asyncio.CancelledError:
            rt.starting.pop(rid, None)
            rt.notify()
            raise
        except Exception as e:
            rt.starting.pop(rid, None)
            rt.failures += 1
            rt.last_error = str(e)
            backoff = min(self.options.start_retry_backoff_s * 2 ** (rt.failures - 1),
                          START_RETRY_BACKOFF_MAX_S)
            rt.retry_at = time.monotonic() + backoff
            self.metrics.replica_starts.inc((*rt.labels(), ("outcome", "failed")))
            log.error("replica %s of deployment %s failed to start: %s", rid, rt.record.id, e)
            if not rt.starting and not rt.ready:
                self._fail_waiters(rt, UnavailableError(
                    f"no replica of deployment {rt.record.id} could start: {e}",
                    deployment_id=rt.record.id))
            rt.notify()
            return
        rt.starting.pop(rid, None)
        if self._closing or rt.record.id not in self.runtimes:
            await self.backend.stop(replica)
            return
        rt.failures = 0
        rt.last_error = None
        rt.ready.append(replica)
        rt.cold_starts_s.append(replica.cold_start_s)
        self.metrics.cold_start.observe(replica.cold_start_s, rt.labels())
        self.metrics.replica_starts.inc((*rt.labels(), ("outcome", "ready")))
        waiters, rt.waiters = rt.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        rt.notify()
        # The desired count may have dropped while this replica was starting.
        self._reconcile(rt)

    def _drain(self, rt: Runtime, replica: Replica) -> None:
        """Stop routing to ``replica``, let its in-flight requests finish, stop it."""
        if replica in rt.ready:
            rt.ready.remove(replica)
        replica.draining = True
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
        await self._stop(rt, replica)

    async def _stop(self, rt: Runtime, replica: Replica) -> None:
        try:
            await self.backend.stop(replica)
        except Exception as e:
            log.error("stopping replica %s failed: %s", replica.id, e)
        log.info("replica %s of deployment %s stopped", replica.id, rt.record.id)

    def _check_alive(self, rt: Runtime) -> None:
        alive = getattr(self.backend, "alive", None)
        if alive is None:
            return
        for replica in [r for r in rt.ready if not alive(r)]:
            tail = "\n".join(list(replica.output)[-5:])
            rt.last_error = f"replica {replica.id} exited unexpectedly; last output:\n{tail}"
            log.error("%s", rt.last_error)
            self._drain(rt, replica)

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
             settings: AutoscalingSettings | None) -> DeploymentRecord:
        rec = self.store.create_deployment(model_id, model_dir, name=name,
                                           development=development, settings=settings)
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
        for dep_id in doomed:
            rt = self.runtimes.pop(dep_id, None)
            if rt is not None:
                await self._retire(rt, NotFoundError(f"model {model_id} was deleted",
                                                     kind="model", ident=model_id))

    async def _retire(self, rt: Runtime, error: Exception) -> None:
        self._fail_waiters(rt, error)
        for task in list(rt.starting.values()):
            task.cancel()
        for replica in list(rt.ready):
            self._drain(rt, replica)
        await asyncio.gather(*rt.starting.values(), *rt.draining, return_exceptions=True)

    # -- promotion ---------------------------------------------------------------------

    def promote(self, model_id: str, env_name: str, deployment_id: str, *,
                scale_down_previous: bool = True) -> DeploymentRecord:
        """Start promoting a deployment to an environment; returns the candidate.

        The candidate inherits the environment's autoscaling settings and is warmed up to
        its ``min_replica`` before traffic moves; then the previous deployment is demoted
        and (by default) scaled to zero at once. Promoting the development deployment
        first publishes a copy of it, as a published deployment is what environments run.
        """
        rec = self.store.get_deployment(model_id, deployment_id)
        self.store.get_environment(model_id, env_name)
        key = (model_id, env_name)
        running = self.promotions.get(key)
        if running is not None and running.status == "IN_PROGRESS":
            raise ConflictError(
                f"a promotion of deployment {running.deployment_id} to {env_name!r} is "
                "already in progress; wait for it to finish", ident=env_name)
        if rec.is_development:
            rec = self.store.create_deployment(model_id, rec.model_dir,
                                               settings=rec.settings)
        self.store.begin_promotion(model_id, env_name, rec.id)
        self._spawn_promotion(model_id, env_name, rec.id, scale_down_previous)
        return self.store.get_deployment(model_id, rec.id)

    def _spawn_promotion(self, model_id: str, env_name: str, deployment_id: str,
                         scale_down_previous: bool) -> None:
        self.promotions[(model_id, env_name)] = PromotionStatus(deployment_id)
        task = asyncio.create_task(
            self._run_promotion(model_id, env_name, deployment_id, scale_down_previous))
        self._promotion_tasks.add(task)
        task.add_done_callback(self._promotion_tasks.discard)

    async def _run_promotion(self, model_id: str, env_name: str, deployment_id: str,
                             scale_down_previous: bool) -> None:
        status = self.promotions[(model_id, env_name)]
        try:
            rt = self.refresh(deployment_id)
            while len(rt.ready) < rt.record.settings.min_replica:
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
            env = self.store.finish_promotion(model_id, env_name)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.store.abort_promotion(model_id, env_name)
            status.status, status.error = "FAILED", str(e)
            log.error("promotion of %s to %s failed: %s", deployment_id, env_name, e)
            # The candidate inherited the environment's min_replica; without the
            # promotion it should not keep restarting failing replicas.
            if deployment_id in self.runtimes and not self.store.environments_of(deployment_id):
                self.demote(deployment_id)
            return
        status.status = "SUCCEEDED"
        previous = env.previous_deployment_id
        log.info("deployment %s now serves %s of model %s (previous: %s)", deployment_id,
                 env_name, model_id, previous)
        if (scale_down_previous and previous is not None and previous != deployment_id
                and previous in self.runtimes and not self.store.environments_of(previous)):
            self.demote(previous)

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
        ]


def inactive_error(rec: DeploymentRecord) -> NotFoundError:
    return NotFoundError(
        f"deployment {rec.id} ({rec.name}) of model {rec.model_id} is inactive; activate it "
        f"with POST /v1/models/{rec.model_id}/deployments/{rec.id}/activate",
        kind="deployment", ident=rec.id)
