"""The rolling-deployment planner: what both deployments should run, decided purely.

``plan(state, observed, now_s, action)`` is a pure function, shaped like
:func:`control.autoscaler.decide`: no clock, no I/O, no randomness. The executor calls it
every tick with the ready replica counts it observes and the state the previous call
returned (persisted as JSON, so a restarted control plane continues from its step), and
applies what it returns: a replica target for each deployment, the share of traffic the
candidate gets, and the documented status. Tests drive it with a fake clock over whole
trajectories.

The rules follow the seed documentation ("Rolling deployments"):

- ``start`` fixes the rollout's size once: the previous deployment's replica count ``n``
  (at least 1) grown by ``replica_overhead_percent``, ``total = ceil(n x (100 + o) / 100)``.
  With an overhead the previous deployment is first pre-provisioned to ``total`` (status
  RELEASING) before anything moves; the candidate ends with ``total`` replicas too, and
  autoscaling trims both once the promotion is over.
- A step moves ``step`` replicas: ``ceil(total x max_surge_percent / 100)`` in surge mode,
  ``floor(total x max_unavailable_percent / 100)`` in unavailable mode (a *maximum*
  unavailable, so rounded down, as Kubernetes does), at least one, and never all of
  them: at most ``total - 1`` may be unavailable. A single replica cannot be replaced
  with one unavailable without serving from zero, so a one-replica rollout in
  unavailable mode surges by one replica instead: never zero serving replicas.
- After ``k`` steps the candidate has ``c(k) = min(total, k x step)`` replicas, the
  previous ``total - c(k)``, and the candidate gets ``c(k) / total`` of the traffic.
- Surge mode, step ``k -> k+1``: scale the candidate up to ``c(k+1)``; once that many are
  ready, shift traffic to ``c(k+1) / total`` and scale the previous down to
  ``total - c(k+1)``. Ready replicas never drop below what serves before the step.
- Unavailable mode: scale the previous down to ``total - c(k+1)`` first, raise the
  candidate once those replicas are gone, shift once the candidate is ready. Ready
  replicas never drop below ``total - step``.
- After each shift, wait ``stabilization_time_seconds`` before the next step (no wait
  after the last: the promotion has SUCCEEDED). Pause takes effect at the next step
  boundary (after a shift); PAUSED holds replicas and split. Resume continues; time spent
  paused counts towards the stabilization wait that was running.
- Cancel ramps down (RAMPING_DOWN): the same steps backwards, capacity first in surge
  mode and candidate first in unavailable mode, without stabilization waits (a rollback
  should not linger), ending CANCELED with all traffic on the previous deployment.
  Force cancel ends CANCELED at once; force roll forward ends SUCCEEDED at once, also
  during a ramp-down. Both may leave a deployment under-provisioned, as documented.
- A candidate that does not reach its step's count within ``ready_timeout_s`` (or that
  the executor reports failed) ends the promotion FAILED with all traffic on the
  previous deployment, which returns to ``total`` replicas.
- The traffic split only ever names a deployment with ready replicas (counting only
  those its new target keeps) while the other has some: a share the candidate cannot
  serve yet goes to the previous one, and the reverse.

Times are the executor's clock in seconds; a clock that reads earlier than the state's
own times (a restart on a monotonic clock) restarts the wait in progress from ``now``
rather than stalling it. Phases are the planner's own finer states;
:attr:`RolloutState.status` maps them onto the seven documented statuses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from typing import Any

from control.errors import ConflictError, ControlError
from control.promotion_settings import (
    CLEANUP_KEEP,
    CLEANUP_STRATEGIES,
    MODE_SURGE,
    MODE_UNAVAILABLE,
    PromotionSettings,
)

# How long a step may wait for the replicas it asked for before giving up (the
# candidate's: FAILED; the previous deployment's: move on without them).
DEFAULT_READY_TIMEOUT_S = 900.0
STATE_VERSION = 1
# Percentages are reported with this many decimals (1/3 -> 33.33).
PERCENT_DECIMALS = 2
# Transitions one call may make: stabilization 0 chains a shift into the next step's
# scale-up in the same call; the bound only guards against a bug looping for ever.
MAX_TRANSITIONS_PER_CALL = 8


class Status(StrEnum):
    """The documented statuses of ``in_progress_promotion``."""

    RELEASING = "RELEASING"
    RAMPING_UP = "RAMPING_UP"
    PAUSED = "PAUSED"
    RAMPING_DOWN = "RAMPING_DOWN"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED})


class Action(StrEnum):
    """What a client asked for; the API path is ``{value}_promotion``."""

    NONE = "none"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    FORCE_CANCEL = "force_cancel"
    FORCE_ROLL_FORWARD = "force_roll_forward"

    @property
    def path(self) -> str:
        return f"{self.value}_promotion"


ACTIONS_BY_PATH = {a.path: a for a in Action if a is not Action.NONE}


class Phase(StrEnum):
    PROVISION = "provision"    # pre-provisioning the previous deployment (overhead)
    SCALE_UP = "scale_up"      # moving from step k to k+1
    STABILIZE = "stabilize"    # after a shift, waiting stabilization_time_seconds
    PAUSED = "paused"
    RAMP_DOWN = "ramp_down"    # graceful cancel, moving from step k to k-1
    DONE = "done"              # terminal; the status is in ``outcome``


class RolloutStateError(ControlError, ValueError):
    """A persisted rollout state (or an observation) is malformed; names the field."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(f"rollout: {field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Observed:
    """What the executor sees now: ready replicas of each deployment, and whether the
    candidate is failing to start (e.g. its start failures passed the executor's bound)."""

    previous_ready: int
    candidate_ready: int
    candidate_failed: bool = False

    def __post_init__(self) -> None:
        for name in ("previous_ready", "candidate_ready"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RolloutStateError(f"must be a count (>= 0), got {value!r}", field=name)


@dataclass(frozen=True)
class RolloutState:
    """What the planner remembers between calls; persisted as :meth:`to_json`.

    The rollout's shape (mode, size, step, waits, cleanup) is fixed at :func:`start`, so
    editing the environment's settings does not change a promotion already running.
    Times are seconds on the executor's clock; persist with a wall clock, not a
    monotonic one, if the state must survive a restart.
    """

    mode: str
    base_replicas: int
    total: int
    step_size: int
    stabilization_s: float
    cleanup: str
    ready_timeout_s: float
    phase: Phase
    step: int
    started_at_s: float
    phase_since_s: float
    shifted_at_s: float | None = None
    pause_requested: bool = False
    outcome: Status | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        def bad(field: str, message: str) -> RolloutStateError:
            return RolloutStateError(message, field=field)

        if self.mode not in (MODE_SURGE, MODE_UNAVAILABLE):
            raise bad("mode", f"{self.mode!r} is not {MODE_SURGE!r} or {MODE_UNAVAILABLE!r}")
        for name in ("base_replicas", "total", "step_size", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, f"must be an integer, got {value!r}")
        if not 1 <= self.base_replicas <= self.total:
            raise bad("base_replicas", f"{self.base_replicas} is not in 1-{self.total}")
        if not 1 <= self.step_size <= self.total:
            raise bad("step_size", f"{self.step_size} is not in 1-{self.total}")
        if self.mode == MODE_UNAVAILABLE and self.step_size >= self.total:
            raise bad("step_size", f"{self.step_size} would leave no replica serving")
        if not 0 <= self.step <= self.steps:
            raise bad("step", f"{self.step} is not in 0-{self.steps}")
        if not self.stabilization_s >= 0:
            raise bad("stabilization_s", f"{self.stabilization_s} is negative")
        if not self.ready_timeout_s > 0:
            raise bad("ready_timeout_s", f"{self.ready_timeout_s} is not positive")
        if self.cleanup not in CLEANUP_STRATEGIES:
            raise bad("cleanup", f"{self.cleanup!r} is not one of {CLEANUP_STRATEGIES}")
        if (self.phase is Phase.DONE) != (self.outcome is not None):
            raise bad("outcome", "is set exactly when the phase is 'done'")
        if self.outcome is not None and self.outcome not in TERMINAL:
            raise bad("outcome", f"{self.outcome} is not a terminal status")

    @property
    def steps(self) -> int:
        """Steps from no candidate replica to all of them."""
        return math.ceil(self.total / self.step_size)

    def candidate_at(self, k: int) -> int:
        return min(self.total, k * self.step_size)

    @property
    def status(self) -> Status:
        if self.outcome is not None:
            return self.outcome
        if self.phase is Phase.PAUSED:
            return Status.PAUSED
        if self.phase is Phase.RAMP_DOWN:
            return Status.RAMPING_DOWN
        if self.phase is Phase.STABILIZE or self.step > 0:
            return Status.RAMPING_UP
        return Status.RELEASING

    @property
    def share_new(self) -> Fraction:
        """The candidate's nominal share of the traffic at this step."""
        if self.outcome is not None:
            return Fraction(1 if self.outcome is Status.SUCCEEDED else 0)
        return Fraction(self.candidate_at(self.step), self.total)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["phase"] = self.phase.value
        data["outcome"] = self.outcome.value if self.outcome is not None else None
        return {"version": STATE_VERSION, **data}

    @classmethod
    def from_json(cls, data: Any) -> RolloutState:
        if not isinstance(data, dict):
            raise RolloutStateError("must be a JSON object", field="state")
        if data.get("version") != STATE_VERSION:
            raise RolloutStateError(f"{data.get('version')!r} is not {STATE_VERSION}",
                                    field="version")
        names = {f.name for f in dataclasses.fields(cls)}
        given = set(data) - {"version"}
        if given - names:
            raise RolloutStateError("is not a rollout state field",
                                    field=sorted(given - names)[0])
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING}
        if required - given:
            raise RolloutStateError("is missing", field=sorted(required - given)[0])
        values = {k: data[k] for k in given}
        try:
            values["phase"] = Phase(values["phase"])
            if values.get("outcome") is not None:
                values["outcome"] = Status(values["outcome"])
        except ValueError as e:
            raise RolloutStateError(str(e), field="phase/outcome") from None
        for name in ("stabilization_s", "ready_timeout_s", "started_at_s", "phase_since_s",
                     "shifted_at_s"):
            value = values.get(name)
            if value is None and name == "shifted_at_s":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RolloutStateError(f"must be a number, got {value!r}", field=name)
        return cls(**values)


@dataclass(frozen=True)
class Plan:
    """One call's answer: the state to persist and what to apply now."""

    state: RolloutState
    status: Status
    previous_replicas: int
    candidate_replicas: int
    # The candidate's share of requests, exact (for the router) and as documented.
    share_new: Fraction
    percent_traffic_to_new_version: float
    # Autoscaling stays off for both deployments until a terminal status.
    autoscaling_frozen: bool
    reason: str


def rollout_size(base_replicas: int, replica_overhead_percent: int) -> int:
    """``base`` grown by the overhead percentage, rounded up; never below one."""
    base = max(1, base_replicas)
    return -(-base * (100 + replica_overhead_percent) // 100)


def step_plan(total: int, mode: str, percent: int) -> tuple[str, int]:
    """(mode, replicas per step) for a rollout of ``total`` replicas."""
    if mode == MODE_SURGE:
        return MODE_SURGE, max(1, -(-total * percent // 100))
    unavailable = min(max(1, total * percent // 100), total - 1)
    if unavailable < 1:
        # One replica: replacing it "unavailable" would serve from zero replicas.
        return MODE_SURGE, 1
    return MODE_UNAVAILABLE, unavailable


def start(settings: PromotionSettings, previous_replicas: int, now_s: float, *,
          ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> RolloutState:
    """The state of a rolling promotion beginning at ``now_s``; ``previous_replicas`` is
    the previous deployment's replica count (the executor passes at least the
    environment's ``min_replica``; zero counts as one)."""
    config = settings.rolling_deploy_config
    base = max(1, previous_replicas)
    total = rollout_size(base, config.replica_overhead_percent)
    mode, step_size = step_plan(total, config.mode, config.step_percent)
    phase = Phase.PROVISION if total > base else Phase.SCALE_UP
    return RolloutState(mode=mode, base_replicas=base, total=total, step_size=step_size,
                        stabilization_s=config.stabilization_time_seconds,
                        cleanup=settings.promotion_cleanup_strategy,
                        ready_timeout_s=ready_timeout_s, phase=phase, step=0,
                        started_at_s=now_s, phase_since_s=now_s)


# -- actions ----------------------------------------------------------------------------

def check_action(status: Status | None, action: Action, *, rolling: bool,
                 pause_requested: bool = False, env_name: str = "") -> None:
    """Raise :class:`ConflictError` (409) when ``action`` is not allowed in ``status``.

    The table: every action needs a promotion in progress (``status`` not None and not
    terminal). Pause and resume need a rolling promotion; pause is refused during a
    graceful cancel; resume needs a paused promotion (or a pause still pending). Cancel,
    force cancel and force roll forward are allowed in every non-terminal status.
    """
    where = f" to {env_name!r}" if env_name else ""
    if status is None or status in TERMINAL:
        ended = f" (the last one ended {status.value})" if status is not None else ""
        raise ConflictError(f"no promotion{where} is in progress{ended}", ident=env_name)
    if action in (Action.NONE, Action.CANCEL, Action.FORCE_CANCEL,
                  Action.FORCE_ROLL_FORWARD):
        return
    if not rolling:
        raise ConflictError(
            f"the promotion{where} is not a rolling deployment; {action.path} applies "
            "only to rolling deployments (promotion_settings.rolling_deploy)",
            ident=env_name)
    if status is Status.RAMPING_DOWN:
        raise ConflictError(
            f"the promotion{where} is being canceled (RAMPING_DOWN); {action.path} does "
            "not apply; force_cancel_promotion or force_roll_forward_promotion ends it now",
            ident=env_name)
    if action is Action.RESUME and status is not Status.PAUSED and not pause_requested:
        raise ConflictError(f"the promotion{where} is not paused ({status.value})",
                            ident=env_name)


def non_rolling_outcome(action: Action) -> Status:
    """What an action does to a promotion that is not rolling (checked first with
    :func:`check_action`): cancel is an instant CANCELED, as documented; force roll
    forward swaps the environment to the candidate now."""
    if action in (Action.CANCEL, Action.FORCE_CANCEL):
        return Status.CANCELED
    if action is Action.FORCE_ROLL_FORWARD:
        return Status.SUCCEEDED
    raise ConflictError(f"{action.path} applies only to rolling deployments")


def apply_action(state: RolloutState, action: Action, now_s: float, *,
                 env_name: str = "") -> RolloutState:
    """The state right after a client's action; its ``status`` is the action's answer
    (cancel of a rolling promotion: RAMPING_DOWN, as documented)."""
    check_action(state.status, action, rolling=True, pause_requested=state.pause_requested,
                 env_name=env_name)
    replace = dataclasses.replace
    if action is Action.PAUSE:
        if state.phase is Phase.STABILIZE:  # between steps: the boundary is now
            return replace(state, phase=Phase.PAUSED, phase_since_s=now_s,
                           pause_requested=False)
        if state.phase is Phase.PAUSED:
            return state
        return replace(state, pause_requested=True)
    if action is Action.RESUME:
        if state.phase is Phase.PAUSED:
            return replace(state, phase=Phase.STABILIZE, phase_since_s=now_s)
        return replace(state, pause_requested=False)
    if action is Action.CANCEL:
        if state.phase is Phase.RAMP_DOWN:
            return state
        return replace(state, phase=Phase.RAMP_DOWN, phase_since_s=now_s,
                       pause_requested=False, reason="canceled")
    if action is Action.FORCE_CANCEL:
        return _finish(state, Status.CANCELED, now_s, "force canceled")
    if action is Action.FORCE_ROLL_FORWARD:
        return _finish(state, Status.SUCCEEDED, now_s, "force rolled forward")
    return state


def _finish(state: RolloutState, outcome: Status, now_s: float, reason: str) -> RolloutState:
    return dataclasses.replace(state, phase=Phase.DONE, outcome=outcome, phase_since_s=now_s,
                               pause_requested=False, reason=reason)


# -- the plan ---------------------------------------------------------------------------

def plan(state: RolloutState, observed: Observed, now_s: float,
         action: Action = Action.NONE) -> Plan:
    """Apply ``action`` (if any), advance as far as ``observed`` allows, and say what both
    deployments should run now. At most one traffic shift happens per call."""
    if state.phase_since_s > now_s or (state.shifted_at_s or 0.0) > now_s:
        # The clock went back (a restart on a monotonic clock): the waits running now
        # restart from now rather than last until the old clock's time comes round.
        state = dataclasses.replace(
            state, phase_since_s=min(state.phase_since_s, now_s),
            shifted_at_s=None if state.shifted_at_s is None else min(state.shifted_at_s,
                                                                        now_s))
    if action is not Action.NONE:
        state = apply_action(state, action, now_s)
    shifted = False
    for _ in range(MAX_TRANSITIONS_PER_CALL):
        nxt = _advance(state, observed, now_s, may_shift=not shifted)
        if nxt is None:
            break
        shifted = shifted or nxt.step != state.step
        state = nxt
    previous, candidate = _targets(state, observed)
    # Replicas above a target are drained now, so only what stays counts as ready.
    share = _routable_share(state, min(observed.previous_ready, previous),
                            min(observed.candidate_ready, candidate))
    return Plan(state=state, status=state.status, previous_replicas=previous,
                candidate_replicas=candidate, share_new=share,
                percent_traffic_to_new_version=round(float(share * 100), PERCENT_DECIMALS),
                autoscaling_frozen=state.outcome is None,
                reason=_describe(state, observed, now_s))


def _describe(s: RolloutState, obs: Observed, now: float) -> str:
    """One line for logs and the environment view: what the rollout waits for."""
    k, steps, c = s.step, s.steps, s.candidate_at
    if s.outcome is not None:
        return s.reason
    if s.phase is Phase.PROVISION:
        return (f"pre-provisioning the previous deployment: {obs.previous_ready} of "
                f"{s.total} replicas ready")
    if s.phase is Phase.SCALE_UP:
        room = s.total - c(k + 1)
        if s.mode == MODE_UNAVAILABLE and obs.previous_ready > room:
            return f"step {k + 1}/{steps}: scaling the previous deployment down to {room}"
        return (f"step {k + 1}/{steps}: {obs.candidate_ready} of {c(k + 1)} candidate "
                "replicas ready")
    if s.phase is Phase.STABILIZE:
        since = s.shifted_at_s if s.shifted_at_s is not None else s.phase_since_s
        left = max(0.0, s.stabilization_s - (now - since))
        return f"step {k}/{steps} done; stabilizing for {left:g} s more"
    if s.phase is Phase.PAUSED:
        return f"paused after step {k}/{steps}"
    want = s.total - c(k - 1)
    return (f"canceling, step {k}/{steps} back: {obs.previous_ready} of {want} previous "
            "replicas ready")


def _advance(s: RolloutState, obs: Observed, now: float, *,
             may_shift: bool) -> RolloutState | None:
    """The next state, or None when nothing changes until the world does."""
    replace = dataclasses.replace
    waited = now - s.phase_since_s
    timed_out = waited >= s.ready_timeout_s
    if s.phase is Phase.PROVISION:
        if obs.previous_ready >= s.total or timed_out:
            return replace(s, phase=Phase.SCALE_UP, phase_since_s=now)
        return None
    if s.phase is Phase.SCALE_UP:
        want = s.candidate_at(s.step + 1)
        if obs.candidate_failed:
            return _finish(s, Status.FAILED, now, "the candidate failed to start")
        if obs.candidate_ready >= want:
            if not may_shift:
                return None
            step = s.step + 1
            if step == s.steps:
                return _finish(replace(s, step=step, shifted_at_s=now), Status.SUCCEEDED,
                               now, "all replicas and traffic on the candidate")
            phase = Phase.PAUSED if s.pause_requested else Phase.STABILIZE
            return replace(s, step=step, phase=phase, phase_since_s=now, shifted_at_s=now,
                           pause_requested=False)
        if timed_out:
            return _finish(s, Status.FAILED, now,
                           f"the candidate had {obs.candidate_ready} of {want} replicas "
                           f"ready after {waited:g} s")
        return None
    if s.phase is Phase.STABILIZE:
        if s.pause_requested:
            return replace(s, phase=Phase.PAUSED, phase_since_s=now, pause_requested=False)
        since = s.shifted_at_s if s.shifted_at_s is not None else s.phase_since_s
        if now - since >= s.stabilization_s:
            return replace(s, phase=Phase.SCALE_UP, phase_since_s=now)
        return None
    if s.phase is Phase.RAMP_DOWN:
        if s.step == 0:
            return _finish(s, Status.CANCELED, now, "canceled; all traffic on the previous "
                           "deployment")
        want = s.total - s.candidate_at(s.step - 1)
        if (obs.previous_ready >= want or timed_out) and may_shift:
            return replace(s, step=s.step - 1, phase_since_s=now, shifted_at_s=now)
        return None
    return None  # PAUSED and DONE change only by an action


def _targets(s: RolloutState, obs: Observed) -> tuple[int, int]:
    """(previous, candidate) replica targets for this state and observation."""
    total, k, c = s.total, s.step, s.candidate_at
    if s.outcome is Status.SUCCEEDED:
        previous = total - c(k) if s.cleanup == CLEANUP_KEEP else 0
        return previous, total
    if s.outcome is not None:
        return total, 0
    if s.phase is Phase.PROVISION:
        return total, 0
    if s.phase is Phase.SCALE_UP:
        if s.mode == MODE_SURGE:
            return total - c(k), c(k + 1)
        previous = total - c(k + 1)
        # Unavailable mode: room first, then the candidate's new replicas.
        return previous, c(k + 1) if obs.previous_ready <= previous else c(k)
    if s.phase is Phase.RAMP_DOWN:
        if s.mode == MODE_SURGE:
            return total - c(k - 1), c(k)
        # Unavailable mode backwards: the candidate gives up a step's replicas (once the
        # previous holds its share of this step), then the previous grows into the room.
        candidate = c(k - 1) if obs.previous_ready >= total - c(k) else c(k)
        previous = total - c(k - 1) if obs.candidate_ready <= c(k - 1) else total - c(k)
        return previous, candidate
    return total - c(k), c(k)  # STABILIZE, PAUSED


def _routable_share(s: RolloutState, previous_ready: int, candidate_ready: int) -> Fraction:
    share = s.share_new
    if s.outcome is not None:
        return share
    # Never route to a deployment without ready replicas while the other has some.
    if share > 0 and candidate_ready == 0 and previous_ready > 0:
        return Fraction(0)
    if share < 1 and previous_ready == 0 and candidate_ready > 0:
        return Fraction(1)
    return share


# -- views ------------------------------------------------------------------------------

def in_progress_promotion_json(p: Plan) -> dict[str, Any]:
    """The planner's part of an environment's ``in_progress_promotion``."""
    s = p.state
    return {"status": p.status.value,
            "percent_traffic_to_new_version": p.percent_traffic_to_new_version,
            "step": s.step, "steps": s.steps, "replicas_per_step": s.step_size,
            "mode": s.mode, "pause_requested": s.pause_requested,
            "previous_replicas": p.previous_replicas, "candidate_replicas": p.candidate_replicas,
            "reason": s.reason}


def action_answer_json(status: Status, *, pause_requested: bool = False) -> dict[str, Any]:
    """The body an action endpoint answers with (``status`` as documented)."""
    messages = {
        Status.PAUSED: "the promotion is paused at its current traffic split",
        Status.RAMPING_DOWN: "the promotion is being canceled; traffic ramps back to the "
                             "previous deployment",
        Status.CANCELED: "the promotion was canceled; all traffic is on the previous "
                         "deployment",
        Status.SUCCEEDED: "the promotion completed; all traffic is on the candidate",
    }
    if pause_requested:
        message = "the promotion pauses after the current step completes"
    else:
        message = messages.get(status, f"the promotion is {status.value}")
    return {"status": status.value, "message": message}
