"""Autoscaling settings: the six knobs of a deployment, their defaults and documented ranges.

The field names, defaults and ranges are Baseten's (management API,
``PATCH .../autoscaling_settings``), so a body written for that API works here unchanged.
Settings are a frozen dataclass validated on construction: an instance that exists is in
range, and every error names the field and its allowed range. A PATCH is applied with
:meth:`AutoscalingSettings.patched`, which validates the combination (``min_replica`` may
not exceed ``max_replica``) as well as each field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from control.errors import SettingsError

# The documented bounds; ``None`` means unbounded above.
MIN_REPLICA_RANGE = (0, None)
MAX_REPLICA_RANGE = (1, None)
AUTOSCALING_WINDOW_S_RANGE = (10, 3600)
SCALE_DOWN_DELAY_S_RANGE = (0, 3600)
CONCURRENCY_TARGET_RANGE = (1, None)
TARGET_UTILIZATION_PERCENT_RANGE = (1, 100)

DEFAULT_MIN_REPLICA = 0
DEFAULT_MAX_REPLICA = 1
DEFAULT_AUTOSCALING_WINDOW_S = 60
DEFAULT_SCALE_DOWN_DELAY_S = 900
DEFAULT_CONCURRENCY_TARGET = 1
DEFAULT_TARGET_UTILIZATION_PERCENT = 70

# A development deployment is one mutable replica that scales to zero when idle.
DEVELOPMENT_MIN_REPLICA = 0
DEVELOPMENT_MAX_REPLICA = 1

RANGES: dict[str, tuple[int, int | None]] = {
    "min_replica": MIN_REPLICA_RANGE,
    "max_replica": MAX_REPLICA_RANGE,
    "autoscaling_window": AUTOSCALING_WINDOW_S_RANGE,
    "scale_down_delay": SCALE_DOWN_DELAY_S_RANGE,
    "concurrency_target": CONCURRENCY_TARGET_RANGE,
    "target_utilization_percentage": TARGET_UTILIZATION_PERCENT_RANGE,
}
UNITS = {"autoscaling_window": " s", "scale_down_delay": " s",
         "target_utilization_percentage": " %"}
# Baseten fields bdn does not implement: accepted as null (clients send them so), refused
# with a clear sentence otherwise.
UNSUPPORTED_FIELDS = frozenset({"target_in_flight_tokens", "max_scale_down_rate"})


def describe_range(field: str) -> str:
    low, high = RANGES[field]
    unit = UNITS.get(field, "")
    return f">= {low}" if high is None else f"{low}-{high}{unit}"


def _check_int(field: str, value: object) -> int:
    # bool is an int subclass; ``true`` for a replica count is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"must be an integer, got {value!r}", field=field,
                            allowed=describe_range(field))
    low, high = RANGES[field]
    if value < low or (high is not None and value > high):
        raise SettingsError(f"{value} is out of range", field=field,
                            allowed=describe_range(field))
    return value


@dataclass(frozen=True)
class AutoscalingSettings:
    """One deployment's autoscaling settings (durations in seconds, as the API has them)."""

    min_replica: int = DEFAULT_MIN_REPLICA
    max_replica: int = DEFAULT_MAX_REPLICA
    autoscaling_window: int = DEFAULT_AUTOSCALING_WINDOW_S
    scale_down_delay: int = DEFAULT_SCALE_DOWN_DELAY_S
    concurrency_target: int = DEFAULT_CONCURRENCY_TARGET
    target_utilization_percentage: int = DEFAULT_TARGET_UTILIZATION_PERCENT

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_int(f.name, getattr(self, f.name))
        if self.min_replica > self.max_replica:
            raise SettingsError(
                f"{self.min_replica} is greater than max_replica ({self.max_replica})",
                field="min_replica", allowed=f"0-{self.max_replica} (at most max_replica)")

    @property
    def per_replica_capacity(self) -> float:
        """In-flight requests one replica should carry: target x utilisation."""
        return self.concurrency_target * self.target_utilization_percentage / 100.0

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> AutoscalingSettings:
        return cls().patched(data or {})

    def patched(self, patch: Mapping[str, Any]) -> AutoscalingSettings:
        """These settings with the non-null fields of ``patch`` applied (Baseten: a field
        passed as null or left out is unchanged). Unknown fields are rejected by name."""
        if not isinstance(patch, Mapping):
            raise SettingsError("the body must be a JSON object", field="autoscaling_settings")
        known = set(RANGES)
        changes: dict[str, int] = {}
        for key, value in patch.items():
            if key in UNSUPPORTED_FIELDS:
                if value is None:
                    continue
                raise SettingsError("is not supported by bdn (scale-down removes half the "
                                    "excess per step; scaling follows in-flight requests)",
                                    field=key)
            if key not in known:
                raise SettingsError(
                    "is not an autoscaling setting", field=key,
                    allowed=", ".join(sorted(known)))
            if value is not None:
                changes[key] = _check_int(key, value)
        return dataclasses.replace(self, **changes)

    def for_development(self) -> AutoscalingSettings:
        """The development deployment keeps its fixed replica range."""
        return dataclasses.replace(self, min_replica=DEVELOPMENT_MIN_REPLICA,
                                   max_replica=DEVELOPMENT_MAX_REPLICA)
