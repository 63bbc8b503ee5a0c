"""An environment's promotion settings: rolling deployments and the cleanup strategy.

The names, ranges and defaults are the seed documentation's ("Rolling deployments":
``promotion_settings`` on ``PATCH /v1/models/{model_id}/environments/{env_name}``), so a
body written for that API works here unchanged:

- ``rolling_deploy`` (default ``false``: rolling deployments are disabled by default);
- ``rolling_deploy_config``: ``max_surge_percent`` 0-50, ``max_unavailable_percent``
  0-50 (exactly one of the two non-zero), ``stabilization_time_seconds`` 0-3600,
  ``replica_overhead_percent`` 0-500;
- ``promotion_cleanup_strategy``: ``SCALE_TO_ZERO`` (the default), ``KEEP`` or
  ``DEACTIVATE``.

The documentation gives no defaults for the four numbers; bdn takes the values of its
"enable rolling deployments" example (10, 0, 60, 0), so ``{"rolling_deploy": true}``
alone behaves as that example does.

Like :mod:`control.settings`, the records are frozen dataclasses validated on
construction, so an instance that exists is valid; a PATCH is applied with ``patched``
(a field left out or sent as null is unchanged, as the documentation's second example
sets only ``promotion_cleanup_strategy``). Unknown keys are errors naming the key, never
dropped, and every error names the full field path and its allowed range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from control.errors import SettingsError

MAX_SURGE_PERCENT_RANGE = (0, 50)
MAX_UNAVAILABLE_PERCENT_RANGE = (0, 50)
STABILIZATION_TIME_S_RANGE = (0, 3600)
REPLICA_OVERHEAD_PERCENT_RANGE = (0, 500)

DEFAULT_ROLLING_DEPLOY = False
DEFAULT_MAX_SURGE_PERCENT = 10
DEFAULT_MAX_UNAVAILABLE_PERCENT = 0
DEFAULT_STABILIZATION_TIME_S = 60
DEFAULT_REPLICA_OVERHEAD_PERCENT = 0

CLEANUP_SCALE_TO_ZERO = "SCALE_TO_ZERO"
CLEANUP_KEEP = "KEEP"
CLEANUP_DEACTIVATE = "DEACTIVATE"
CLEANUP_STRATEGIES = (CLEANUP_SCALE_TO_ZERO, CLEANUP_KEEP, CLEANUP_DEACTIVATE)
DEFAULT_CLEANUP_STRATEGY = CLEANUP_SCALE_TO_ZERO

# Provisioning modes (the planner's names for the two mutually exclusive settings).
MODE_SURGE = "surge"
MODE_UNAVAILABLE = "unavailable"

SETTINGS_FIELD = "promotion_settings"
CONFIG_FIELD = f"{SETTINGS_FIELD}.rolling_deploy_config"

CONFIG_RANGES: dict[str, tuple[int, int]] = {
    "max_surge_percent": MAX_SURGE_PERCENT_RANGE,
    "max_unavailable_percent": MAX_UNAVAILABLE_PERCENT_RANGE,
    "stabilization_time_seconds": STABILIZATION_TIME_S_RANGE,
    "replica_overhead_percent": REPLICA_OVERHEAD_PERCENT_RANGE,
}
CONFIG_UNITS = {"max_surge_percent": " %", "max_unavailable_percent": " %",
                "stabilization_time_seconds": " s", "replica_overhead_percent": " %"}
SETTINGS_KEYS = ("rolling_deploy", "rolling_deploy_config", "promotion_cleanup_strategy")


def describe_config_range(key: str) -> str:
    low, high = CONFIG_RANGES[key]
    return f"{low}-{high}{CONFIG_UNITS[key]}"


def _check_config_int(key: str, value: object) -> int:
    field = f"{CONFIG_FIELD}.{key}"
    # bool is an int subclass; ``true`` for a percentage is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"must be an integer, got {value!r}", field=field,
                            allowed=describe_config_range(key))
    low, high = CONFIG_RANGES[key]
    if not low <= value <= high:
        raise SettingsError(f"{value} is out of range", field=field,
                            allowed=describe_config_range(key))
    return value


def _check_object(field: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SettingsError(f"must be a JSON object, got {value!r}", field=field)
    return value


@dataclass(frozen=True)
class RollingDeployConfig:
    """How a rolling promotion moves: the step size (by mode), waits and overhead."""

    max_surge_percent: int = DEFAULT_MAX_SURGE_PERCENT
    max_unavailable_percent: int = DEFAULT_MAX_UNAVAILABLE_PERCENT
    stabilization_time_seconds: int = DEFAULT_STABILIZATION_TIME_S
    replica_overhead_percent: int = DEFAULT_REPLICA_OVERHEAD_PERCENT

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_config_int(f.name, getattr(self, f.name))
        surge, unavailable = self.max_surge_percent, self.max_unavailable_percent
        if (surge == 0) == (unavailable == 0):
            which = "both non-zero" if surge else "both zero"
            raise SettingsError(
                f"max_surge_percent ({surge}) and max_unavailable_percent ({unavailable}) "
                f"are {which}; set exactly one of them (the other to 0)",
                field=f"{CONFIG_FIELD}.max_surge_percent",
                allowed="exactly one of max_surge_percent, max_unavailable_percent non-zero")

    @property
    def mode(self) -> str:
        """``surge`` (candidate up first) or ``unavailable`` (previous down first)."""
        return MODE_SURGE if self.max_surge_percent else MODE_UNAVAILABLE

    @property
    def step_percent(self) -> int:
        """The non-zero one of the two percentages: how much moves per step."""
        return self.max_surge_percent or self.max_unavailable_percent

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def patched(self, patch: Mapping[str, Any]) -> RollingDeployConfig:
        """This config with the non-null fields of ``patch`` applied; the combination is
        checked after merging, so switching modes takes both percentages in one PATCH."""
        patch = _check_object(CONFIG_FIELD, patch)
        changes: dict[str, int] = {}
        for key, value in patch.items():
            if key not in CONFIG_RANGES:
                raise SettingsError("is not a rolling_deploy_config setting",
                                    field=f"{CONFIG_FIELD}.{key}",
                                    allowed=", ".join(CONFIG_RANGES))
            if value is not None:
                changes[key] = _check_config_int(key, value)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PromotionSettings:
    """One environment's ``promotion_settings``."""

    rolling_deploy: bool = DEFAULT_ROLLING_DEPLOY
    rolling_deploy_config: RollingDeployConfig = dataclasses.field(
        default_factory=RollingDeployConfig)
    promotion_cleanup_strategy: str = DEFAULT_CLEANUP_STRATEGY

    def __post_init__(self) -> None:
        if not isinstance(self.rolling_deploy, bool):
            raise SettingsError(f"must be true or false, got {self.rolling_deploy!r}",
                                field=f"{SETTINGS_FIELD}.rolling_deploy")
        if not isinstance(self.rolling_deploy_config, RollingDeployConfig):
            raise SettingsError("must be a rolling deploy config",
                                field=f"{SETTINGS_FIELD}.rolling_deploy_config")
        if self.promotion_cleanup_strategy not in CLEANUP_STRATEGIES:
            raise SettingsError(f"{self.promotion_cleanup_strategy!r} is not a cleanup "
                                "strategy",
                                field=f"{SETTINGS_FIELD}.promotion_cleanup_strategy",
                                allowed=", ".join(CLEANUP_STRATEGIES))

    def to_json(self) -> dict[str, Any]:
        return {"rolling_deploy": self.rolling_deploy,
                "rolling_deploy_config": self.rolling_deploy_config.to_json(),
                "promotion_cleanup_strategy": self.promotion_cleanup_strategy}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> PromotionSettings:
        """Settings from a stored or sent object; what it leaves out takes the defaults."""
        return cls().patched({} if data is None else data)

    def patched(self, patch: Mapping[str, Any]) -> PromotionSettings:
        """These settings with the non-null fields of ``patch`` applied (the API's PATCH
        semantics); ``rolling_deploy_config`` is merged field by field."""
        patch = _check_object(SETTINGS_FIELD, patch)
        changes: dict[str, Any] = {}
        for key, value in patch.items():
            if key not in SETTINGS_KEYS:
                raise SettingsError("is not a promotion setting",
                                    field=f"{SETTINGS_FIELD}.{key}",
                                    allowed=", ".join(SETTINGS_KEYS))
            if value is None:
                continue
            if key == "rolling_deploy_config":
                changes[key] = self.rolling_deploy_config.patched(value)
            else:
                changes[key] = value
        # Construction validates the types of the plain fields with the full field path.
        return dataclasses.replace(self, **changes)
