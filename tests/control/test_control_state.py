"""Autoscaling settings validation and the durable store (SQLite), without HTTP."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from control.errors import ConflictError, NotFoundError, RequestError, SettingsError
from control.promotion_settings import PromotionSettings
from control.settings import AutoscalingSettings
from control.store import PRODUCTION, SCHEMA, Store


def test_defaults_are_the_documented_ones() -> None:
    assert AutoscalingSettings().to_json() == {
        "min_replica": 0, "max_replica": 1, "autoscaling_window": 60,
        "scale_down_delay": 900, "concurrency_target": 1,
        "target_utilization_percentage": 70}


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("min_replica", -1, ">= 0"),
    ("max_replica", 0, ">= 1"),
    ("autoscaling_window", 9, "10-3600 s"),
    ("autoscaling_window", 3601, "10-3600 s"),
    ("scale_down_delay", -1, "0-3600 s"),
    ("scale_down_delay", 3601, "0-3600 s"),
    ("concurrency_target", 0, ">= 1"),
    ("target_utilization_percentage", 0, "1-100 %"),
    ("target_utilization_percentage", 101, "1-100 %"),
])
def test_out_of_range_settings_name_the_field_and_range(field: str, value: int,
                                                        allowed: str) -> None:
    with pytest.raises(SettingsError) as err:
        AutoscalingSettings().patched({field: value})
    assert err.value.field == field
    assert field in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize(("field", "value"), [
    ("autoscaling_window", 10), ("autoscaling_window", 3600), ("scale_down_delay", 0),
    ("scale_down_delay", 3600), ("target_utilization_percentage", 1),
    ("target_utilization_percentage", 100), ("min_replica", 0), ("concurrency_target", 1)])
def test_range_bounds_are_inclusive(field: str, value: int) -> None:
    assert getattr(AutoscalingSettings().patched({field: value}), field) == value


def test_patch_semantics_types_and_combination() -> None:
    s = AutoscalingSettings().patched({"max_replica": 4, "min_replica": None})
    assert (s.min_replica, s.max_replica) == (0, 4)  # null leaves a field unchanged
    with pytest.raises(SettingsError, match="max_replica"):
        s.patched({"min_replica": 5})
    with pytest.raises(SettingsError, match="integer"):
        s.patched({"max_replica": "3"})
    with pytest.raises(SettingsError, match="integer"):
        s.patched({"max_replica": True})
    with pytest.raises(SettingsError, match="not an autoscaling setting") as err:
        s.patched({"max_replicas": 3})
    assert err.value.field == "max_replicas"
    # Baseten fields bdn lacks: null (as clients send them) is fine, a value is refused.
    assert s.patched({"target_in_flight_tokens": None}) == s
    with pytest.raises(SettingsError, match="not supported") as err:
        s.patched({"max_scale_down_rate": 20})
    assert err.value.field == "max_scale_down_rate"


def test_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    store = Store(path)
    model = store.create_model("llama")
    dev = store.create_deployment(model.id, "/m/dev", development=True)
    d1 = store.create_deployment(model.id, "/m/v1")
    d2 = store.create_deployment(model.id, "/m/v2", name="canary")
    store.create_environment(model.id, "staging",
                             AutoscalingSettings(min_replica=1, max_replica=3))
    store.set_deployment_settings(d1.id, AutoscalingSettings(max_replica=7))
    store.begin_promotion(model.id, PRODUCTION, d1.id)
    store.finish_promotion(model.id, PRODUCTION)
    store.set_active(d2.id, False)
    store.close()

    again = Store(path)
    assert [m.name for m in again.list_models()] == ["llama"]
    deps = {d.name: d for d in again.list_deployments(model.id)}
    assert set(deps) == {"development", "deployment-1", "canary"}
    assert deps["development"].id == dev.id and deps["development"].is_development
    assert deps["development"].settings.max_replica == 1
    assert not deps["canary"].active
    # Promotion gave deployment-1 production's settings (defaults) at the time.
    assert deps["deployment-1"].settings == AutoscalingSettings()
    envs = {e.name: e for e in again.list_environments(model.id)}
    assert envs[PRODUCTION].current_deployment_id == d1.id
    assert envs["staging"].settings.min_replica == 1
    # A new published deployment continues the numbering.
    assert again.create_deployment(model.id, "/m/v3").name == "deployment-3"


def test_names_environments_and_deletion_rules(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    m = store.create_model("m")
    with pytest.raises(ConflictError):
        store.create_model("m")
    with pytest.raises(ConflictError, match="production"):
        store.create_environment(m.id, PRODUCTION)
    with pytest.raises(ConflictError, match="cannot be deleted"):
        store.delete_environment(m.id, PRODUCTION)
    with pytest.raises(RequestError) as err:
        store.create_environment(m.id, "Bad Name")
    assert err.value.field == "name"
    d = store.create_deployment(m.id, "/m")
    with pytest.raises(ConflictError, match="already has a deployment"):
        store.create_deployment(m.id, "/m", name="deployment-1")
    store.begin_promotion(m.id, PRODUCTION, d.id)
    with pytest.raises(ConflictError, match="in progress"):
        store.begin_promotion(m.id, PRODUCTION, d.id)
    store.finish_promotion(m.id, PRODUCTION)
    with pytest.raises(ConflictError, match="promote another deployment"):
        store.delete_deployment(m.id, d.id)
    d2 = store.create_deployment(m.id, "/m2")
    store.delete_deployment(m.id, d2.id)
    with pytest.raises(NotFoundError):
        store.get_deployment(m.id, d2.id)
    # Re-pushing the development deployment keeps its id and bumps its revision.
    dev1 = store.create_deployment(m.id, "/dev", development=True)
    dev2 = store.create_deployment(m.id, "/dev2", development=True)
    assert dev1.id == dev2.id and dev2.revision == dev1.revision + 1
    assert dev2.model_dir == "/dev2"


def test_promotion_settings_and_a_promotion_in_progress_survive_reopening(
        tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    store = Store(path)
    m = store.create_model("m")
    d1, d2 = store.create_deployment(m.id, "/m1"), store.create_deployment(m.id, "/m2")
    rolling = PromotionSettings().patched({"rolling_deploy": True, "rolling_deploy_config": {
        "max_surge_percent": 25}, "promotion_cleanup_strategy": "KEEP"})
    store.set_promotion_settings(m.id, PRODUCTION, rolling)
    store.begin_promotion(m.id, PRODUCTION, d1.id)
    store.finish_promotion(m.id, PRODUCTION)
    store.begin_promotion(m.id, PRODUCTION, d2.id, {"rolling": True, "step": 0})
    # Progress is written for the promotion of d2 only.
    store.set_promotion(m.id, PRODUCTION, d2.id, {"rolling": True, "step": 2})
    store.set_promotion(m.id, PRODUCTION, d1.id, {"rolling": True, "step": 9})
    store.close()

    again = Store(path)
    env = again.get_environment(m.id, PRODUCTION)
    assert env.promotion_settings == rolling
    assert env.promoting_deployment_id == d2.id
    assert env.promotion == {"rolling": True, "step": 2}
    assert [e.name for e in again.promotions_in_progress()] == [PRODUCTION]
    again.abort_promotion(m.id, PRODUCTION)
    env = again.get_environment(m.id, PRODUCTION)
    assert env.promotion is None and env.promoting_deployment_id is None
    assert env.promotion_settings == rolling  # settings outlive the promotion


def test_a_state_file_from_before_promotion_settings_opens(tmp_path: Path) -> None:
    """The columns are added to an older file; its environments get the defaults."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA.replace("    promotion_settings TEXT,\n    promotion TEXT,\n", ""))
    db.execute("INSERT INTO models (id, name, created_at) VALUES ('m1', 'm', 'now')")
    db.execute("INSERT INTO environments (model_id, name, created_at, settings) "
               "VALUES ('m1', 'production', 'now', '{}')")
    db.commit()
    db.close()
    store = Store(path)
    env = store.get_environment("m1", PRODUCTION)
    assert env.promotion_settings == PromotionSettings() and env.promotion is None


def test_renaming_a_deployment(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    m = store.create_model("m")
    d1, d2 = store.create_deployment(m.id, "/m1"), store.create_deployment(m.id, "/m2")
    assert store.rename_deployment(m.id, d1.id, "blue").name == "blue"
    assert store.get_deployment(m.id, d1.id).name == "blue"
    assert store.rename_deployment(m.id, d1.id, "blue").name == "blue"  # unchanged is fine
    with pytest.raises(ConflictError, match="already has a deployment named 'blue'"):
        store.rename_deployment(m.id, d2.id, "blue")
    for bad in ("development", "Blue!", 7):
        with pytest.raises(RequestError) as err:
            store.rename_deployment(m.id, d2.id, bad)
        assert err.value.field == "name"
    dev = store.create_deployment(m.id, "/dev", development=True)
    with pytest.raises(RequestError, match="cannot be renamed"):
        store.rename_deployment(m.id, dev.id, "dev2")
