"""An environment's promotion settings: documented names, defaults, ranges and errors.

The bodies are the seed documentation's own examples ("Rolling deployments"), so a
client written against that API gets the same acceptance and the same refusals here.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from control.errors import SettingsError
from control.promotion_settings import PromotionSettings, RollingDeployConfig

# The documentation's "enable rolling deployments" body.
ENABLE_EXAMPLE = json.loads("""{
  "promotion_settings": {
    "rolling_deploy": true,
    "rolling_deploy_config": {
      "max_surge_percent": 10,
      "max_unavailable_percent": 0,
      "stabilization_time_seconds": 60,
      "replica_overhead_percent": 0
    }
  }
}""")
# The documentation's cleanup example: only the strategy, the rest unchanged.
CLEANUP_EXAMPLE = {"promotion_settings": {"promotion_cleanup_strategy": "DEACTIVATE"}}


def test_defaults_are_the_documented_ones() -> None:
    s = PromotionSettings()
    assert s.rolling_deploy is False  # "Rolling deployments are disabled by default."
    assert s.promotion_cleanup_strategy == "SCALE_TO_ZERO"  # "This is the default."
    # Undocumented numbers: the values of the documentation's enable example.
    assert s.to_json() == {
        "rolling_deploy": False,
        "rolling_deploy_config": {"max_surge_percent": 10, "max_unavailable_percent": 0,
                                  "stabilization_time_seconds": 60,
                                  "replica_overhead_percent": 0},
        "promotion_cleanup_strategy": "SCALE_TO_ZERO"}
    assert PromotionSettings.from_json(None) == s
    assert PromotionSettings.from_json({}) == s


def test_the_documented_examples_apply_as_a_patch() -> None:
    enabled = PromotionSettings().patched(ENABLE_EXAMPLE["promotion_settings"])
    assert enabled.rolling_deploy is True
    assert enabled.rolling_deploy_config.to_json() == \
        ENABLE_EXAMPLE["promotion_settings"]["rolling_deploy_config"]
    assert enabled.rolling_deploy_config.mode == "surge"
    cleaned = enabled.patched(CLEANUP_EXAMPLE["promotion_settings"])
    assert cleaned.promotion_cleanup_strategy == "DEACTIVATE"
    assert cleaned.rolling_deploy is True  # left out: unchanged
    assert cleaned.rolling_deploy_config == enabled.rolling_deploy_config


def test_the_config_merges_field_by_field_and_null_leaves_a_field_unchanged() -> None:
    s = PromotionSettings().patched({"rolling_deploy_config": {"stabilization_time_seconds":
                                                               5}})
    assert s.rolling_deploy_config.stabilization_time_seconds == 5
    assert s.rolling_deploy_config.max_surge_percent == 10
    same = s.patched({"rolling_deploy": None, "rolling_deploy_config": None,
                      "promotion_cleanup_strategy": None})
    assert same == s
    same = s.patched({"rolling_deploy_config": {"max_surge_percent": None}})
    assert same == s


def test_switching_modes_takes_both_percentages_in_one_patch() -> None:
    s = PromotionSettings().patched({"rolling_deploy_config": {
        "max_surge_percent": 0, "max_unavailable_percent": 20}})
    assert (s.rolling_deploy_config.mode, s.rolling_deploy_config.step_percent) == \
        ("unavailable", 20)
    with pytest.raises(SettingsError, match="both non-zero; set exactly one"):
        PromotionSettings().patched({"rolling_deploy_config": {"max_unavailable_percent": 20}})


@pytest.mark.parametrize(("config", "field", "allowed"), [
    ({"max_surge_percent": 51}, "max_surge_percent", "0-50 %"),
    ({"max_surge_percent": -1}, "max_surge_percent", "0-50 %"),
    ({"max_surge_percent": 0, "max_unavailable_percent": 51}, "max_unavailable_percent",
     "0-50 %"),
    ({"stabilization_time_seconds": 3601}, "stabilization_time_seconds", "0-3600 s"),
    ({"replica_overhead_percent": 501}, "replica_overhead_percent", "0-500 %"),
    ({"replica_overhead_percent": 1.5}, "replica_overhead_percent", "0-500 %"),
    ({"stabilization_time_seconds": True}, "stabilization_time_seconds", "0-3600 s"),
    ({"max_surge_percent": "10"}, "max_surge_percent", "0-50 %"),
])
def test_a_value_out_of_its_documented_range_is_refused_naming_field_and_range(
        config: dict[str, Any], field: str, allowed: str) -> None:
    with pytest.raises(SettingsError) as err:
        PromotionSettings().patched({"rolling_deploy_config": config})
    full = f"promotion_settings.rolling_deploy_config.{field}"
    assert err.value.field == full
    assert str(err.value).startswith(f"{full}: ")
    assert f"(allowed: {allowed})" in str(err.value)
    assert err.value.status == 400


def test_the_range_ends_are_accepted() -> None:
    c = RollingDeployConfig(max_surge_percent=50, stabilization_time_seconds=3600,
                            replica_overhead_percent=500)
    assert c.mode == "surge"
    c = RollingDeployConfig(max_surge_percent=0, max_unavailable_percent=50,
                            stabilization_time_seconds=0, replica_overhead_percent=0)
    assert c.mode == "unavailable"


def test_both_percentages_zero_is_refused() -> None:
    with pytest.raises(SettingsError, match="are both zero; set exactly one") as err:
        RollingDeployConfig(max_surge_percent=0, max_unavailable_percent=0)
    assert err.value.field == "promotion_settings.rolling_deploy_config.max_surge_percent"


@pytest.mark.parametrize(("patch", "field"), [
    ({"rolling_deploy_confg": {}}, "promotion_settings.rolling_deploy_confg"),
    ({"ramp_up_while_promoting": True}, "promotion_settings.ramp_up_while_promoting"),
    ({"rolling_deploy_config": {"max_surge": 10}},
     "promotion_settings.rolling_deploy_config.max_surge"),
])
def test_unknown_keys_are_refused_never_dropped(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(SettingsError, match="is not a") as err:
        PromotionSettings().patched(patch)
    assert err.value.field == field
    assert "allowed:" in str(err.value)


@pytest.mark.parametrize(("patch", "field", "needle"), [
    ({"rolling_deploy": "yes"}, "promotion_settings.rolling_deploy", "true or false"),
    ({"rolling_deploy": 1}, "promotion_settings.rolling_deploy", "true or false"),
    ({"promotion_cleanup_strategy": "scale_to_zero"},
     "promotion_settings.promotion_cleanup_strategy", "SCALE_TO_ZERO, KEEP, DEACTIVATE"),
    ({"rolling_deploy_config": [10]}, "promotion_settings.rolling_deploy_config",
     "JSON object"),
])
def test_wrong_types_are_refused_naming_the_field(patch: dict[str, Any], field: str,
                                                  needle: str) -> None:
    with pytest.raises(SettingsError, match=needle) as err:
        PromotionSettings().patched(patch)
    assert err.value.field == field


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(SettingsError, match="promotion_settings: must be a JSON object"):
        PromotionSettings.from_json([])  # type: ignore[arg-type]


def test_settings_round_trip_through_json() -> None:
    s = PromotionSettings().patched({"rolling_deploy": True,
                                     "promotion_cleanup_strategy": "KEEP",
                                     "rolling_deploy_config": {
                                         "max_surge_percent": 0,
                                         "max_unavailable_percent": 25,
                                         "replica_overhead_percent": 50}})
    assert PromotionSettings.from_json(json.loads(json.dumps(s.to_json()))) == s
