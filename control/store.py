"""Durable control-plane state in one SQLite file: models, deployments, environments.

What must survive a restart of the control server lives here: the models, their
deployments (model folder, name, active flag, autoscaling settings), their environments
(settings, promotion settings, current and previous deployment, a promotion in progress
with the rollout planner's state when it is a rolling one). What need not
survive (replicas, in-flight counts, the autoscaler's memory) lives in the controller;
after a restart replicas are started again from ``min_replica``.

SQLite because the state is small, relational (a deployment belongs to a model, an
environment points at a deployment) and must change atomically (a promotion updates an
environment and two deployments in one transaction); it is in the standard library and
needs no service. Calls are synchronous: each is a handful of rows on a local file, far
cheaper than the HTTP request that causes it.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control.errors import ConflictError, NotFoundError, RequestError
from control.promotion_settings import PromotionSettings
from control.settings import AutoscalingSettings

PRODUCTION = "production"
DEVELOPMENT = "development"
# Environment and deployment names end up in URLs and Kubernetes object names.
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?")
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    is_development INTEGER NOT NULL,
    model_dir TEXT NOT NULL,
    created_at TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    settings TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1,
    push TEXT,
    UNIQUE (model_id, name)
);
CREATE TABLE IF NOT EXISTS environments (
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    settings TEXT NOT NULL,
    current_deployment_id TEXT,
    previous_deployment_id TEXT,
    promoting_deployment_id TEXT,
    promotion_settings TEXT,
    promotion TEXT,
    PRIMARY KEY (model_id, name)
);
CREATE TABLE IF NOT EXISTS chains (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chain_deployments (
    id TEXT PRIMARY KEY,
    chain_id TEXT NOT NULL REFERENCES chains(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    is_development INTEGER NOT NULL,
    entrypoint TEXT NOT NULL,
    chainlets TEXT NOT NULL
);
"""


def new_id() -> str:
    """An 8-character lowercase id, like Baseten's model and deployment ids."""
    return base64.b32encode(secrets.token_bytes(5)).decode().lower()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_name(name: object, field: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise RequestError(
            f"{name!r} is not a valid name (lowercase letters, digits, '-' and '_', "
            "1-63 characters, starting and ending with a letter or digit)", field=field)
    return name


@dataclass(frozen=True)
class ModelRecord:
    id: str
    name: str
    created_at: str


@dataclass(frozen=True)
class DeploymentRecord:
    id: str
    model_id: str
    name: str
    is_development: bool
    model_dir: str
    created_at: str
    active: bool
    settings: AutoscalingSettings
    # Bumped when the development deployment is re-pushed: replicas of an older
    # revision are replaced.
    revision: int
    # A pushed folder: code and pinned weights manifests (control.push.PushRecord's
    # JSON); None for a deployment run from a folder on the server.
    push: dict[str, Any] | None = None


@dataclass(frozen=True)
class EnvironmentRecord:
    model_id: str
    name: str
    created_at: str
    settings: AutoscalingSettings
    current_deployment_id: str | None
    previous_deployment_id: str | None
    promoting_deployment_id: str | None
    promotion_settings: PromotionSettings = field(default_factory=PromotionSettings)
    # The promotion in progress, as the controller persisted it (a rolling one carries
    # the planner's state, so a restarted control plane continues from its step).
    promotion: dict[str, Any] | None = None


class Store:
    """The SQLite file at ``path`` (created with its schema on first open)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.executescript(SCHEMA)
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(deployments)")}
        if "push" not in columns:  # a state file from before pushes uploaded folders
            self._db.execute("ALTER TABLE deployments ADD COLUMN push TEXT")
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(environments)")}
        for column in ("promotion_settings", "promotion"):  # from before rolling deploys
            if column not in columns:
                self._db.execute(f"ALTER TABLE environments ADD COLUMN {column} TEXT")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- models ------------------------------------------------------------------------

    def create_model(self, name: str) -> ModelRecord:
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise RequestError("must be a non-empty string of at most 200 characters",
                               field="name")
        rec = ModelRecord(new_id(), name, utc_now())
        with self._tx() as db:
            if db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone():
                raise ConflictError(f"a model named {name!r} already exists", ident=name)
            db.execute("INSERT INTO models (id, name, created_at) VALUES (?, ?, ?)",
                       (rec.id, rec.name, rec.created_at))
            # Every model has a production environment from the start.
            db.execute("INSERT INTO environments (model_id, name, created_at, settings) "
                       "VALUES (?, ?, ?, ?)",
                       (rec.id, PRODUCTION, rec.created_at,
                        json.dumps(AutoscalingSettings().to_json())))
        return rec

    def get_model(self, model_id: str) -> ModelRecord:
        row = self._db.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"model {model_id!r} not found", kind="model", ident=model_id)
        return ModelRecord(row["id"], row["name"], row["created_at"])

    def find_model(self, name_or_id: str) -> ModelRecord:
        row = self._db.execute("SELECT * FROM models WHERE id = ? OR name = ? "
                               "ORDER BY id = ? DESC LIMIT 1",
                               (name_or_id, name_or_id, name_or_id)).fetchone()
        if row is None:
            raise NotFoundError(f"model {name_or_id!r} not found", kind="model",
                                ident=name_or_id)
        return ModelRecord(row["id"], row["name"], row["created_at"])

    def list_models(self) -> list[ModelRecord]:
        rows = self._db.execute("SELECT * FROM models ORDER BY created_at, id").fetchall()
        return [ModelRecord(r["id"], r["name"], r["created_at"]) for r in rows]

    def delete_model(self, model_id: str) -> None:
        self.get_model(model_id)
        with self._tx() as db:
            db.execute("DELETE FROM models WHERE id = ?", (model_id,))

    # -- deployments -------------------------------------------------------------------

    @staticmethod
    def _deployment(row: sqlite3.Row) -> DeploymentRecord:
        return DeploymentRecord(
            id=row["id"], model_id=row["model_id"], name=row["name"],
            is_development=bool(row["is_development"]), model_dir=row["model_dir"],
            created_at=row["created_at"], active=bool(row["active"]),
            settings=AutoscalingSettings.from_json(json.loads(row["settings"])),
            revision=row["revision"],
            push=json.loads(row["push"]) if row["push"] else None)

    def create_deployment(self, model_id: str, model_dir: str, *, name: str | None = None,
                          development: bool = False,
                          settings: AutoscalingSettings | None = None,
                          push: dict[str, Any] | None = None) -> DeploymentRecord:
        """A new published deployment, or the (re-pushed) development deployment."""
        self.get_model(model_id)
        if name is not None:
            check_name(name, "name")
            if name == DEVELOPMENT:
                raise RequestError("is reserved for the development deployment", field="name")
        with self._tx() as db:
            if development:
                row = db.execute("SELECT * FROM deployments WHERE model_id = ? AND "
                                 "is_development = 1", (model_id,)).fetchone()
                if row is not None:
                    db.execute("UPDATE deployments SET model_dir = ?, revision = revision + 1, "
                               "active = 1, push = ? WHERE id = ?",
                               (model_dir, json.dumps(push) if push else None, row["id"]))
                    return self._deployment(db.execute(
                        "SELECT * FROM deployments WHERE id = ?", (row["id"],)).fetchone())
                name = DEVELOPMENT
                settings = (settings or AutoscalingSettings()).for_development()
            else:
                seq = db.execute("SELECT next_seq FROM models WHERE id = ?",
                                 (model_id,)).fetchone()[0]
                if name is None:
                    name = f"deployment-{seq}"
                if db.execute("SELECT 1 FROM deployments WHERE model_id = ? AND name = ?",
                              (model_id, name)).fetchone():
                    raise ConflictError(f"model {model_id} already has a deployment named "
                                        f"{name!r}", ident=name)
                db.execute("UPDATE models SET next_seq = ? WHERE id = ?", (seq + 1, model_id))
            rec = DeploymentRecord(
                id=new_id(), model_id=model_id, name=name, is_development=development,
                model_dir=model_dir, created_at=utc_now(), active=True,
                settings=settings or AutoscalingSettings(), revision=1, push=push)
            db.execute(
                "INSERT INTO deployments (id, model_id, name, is_development, model_dir, "
                "created_at, active, settings, revision, push) "
                "VALUES (?, ?, ?, ?, ?, ?, 1, ?, 1, ?)",
                (rec.id, model_id, rec.name, int(development), model_dir, rec.created_at,
                 json.dumps(rec.settings.to_json()), json.dumps(push) if push else None))
        return rec

    def get_deployment(self, model_id: str, deployment_id: str) -> DeploymentRecord:
        row = self._db.execute("SELECT * FROM deployments WHERE id = ? AND model_id = ?",
                               (deployment_id, model_id)).fetchone()
        if row is None:
            raise NotFoundError(f"deployment {deployment_id!r} of model {model_id!r} not found",
                                kind="deployment", ident=deployment_id)
        return self._deployment(row)

    def development_deployment(self, model_id: str) -> DeploymentRecord:
        row = self._db.execute("SELECT * FROM deployments WHERE model_id = ? AND "
                               "is_development = 1", (model_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"model {model_id!r} has no development deployment "
                                "(push one with `bdn push --watch`)",
                                kind="deployment", ident=DEVELOPMENT)
        return self._deployment(row)

    def list_deployments(self, model_id: str | None = None) -> list[DeploymentRecord]:
        if model_id is None:
            rows = self._db.execute("SELECT * FROM deployments ORDER BY created_at, rowid")
        else:
            rows = self._db.execute("SELECT * FROM deployments WHERE model_id = ? "
                                    "ORDER BY created_at, rowid", (model_id,))
        return [self._deployment(r) for r in rows.fetchall()]

    def set_deployment_settings(self, deployment_id: str,
                                settings: AutoscalingSettings) -> None:
        with self._tx() as db:
            db.execute("UPDATE deployments SET settings = ? WHERE id = ?",
                       (json.dumps(settings.to_json()), deployment_id))
            # The environment's settings follow its current deployment's, so the next
            # promotion inherits what the operator last set.
            db.execute("UPDATE environments SET settings = ? WHERE current_deployment_id = ?",
                       (json.dumps(settings.to_json()), deployment_id))

    def rename_deployment(self, model_id: str, deployment_id: str,
                          name: object) -> DeploymentRecord:
        """Give a published deployment another name (ids, and so paths, stay)."""
        rec = self.get_deployment(model_id, deployment_id)
        if rec.is_development:
            raise RequestError("the development deployment cannot be renamed", field="name")
        check_name(name, "name")
        if name == DEVELOPMENT:
            raise RequestError("is reserved for the development deployment", field="name")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM deployments WHERE model_id = ? AND name = ? AND "
                          "id != ?", (model_id, name, deployment_id)).fetchone():
                raise ConflictError(f"model {model_id} already has a deployment named "
                                    f"{name!r}", ident=str(name))
            db.execute("UPDATE deployments SET name = ? WHERE id = ?", (name, deployment_id))
        return self.get_deployment(model_id, deployment_id)

    def set_active(self, deployment_id: str, active: bool) -> None:
        with self._tx() as db:
            db.execute("UPDATE deployments SET active = ? WHERE id = ?",
                       (int(active), deployment_id))

    def delete_deployment(self, model_id: str, deployment_id: str) -> None:
        self.get_deployment(model_id, deployment_id)
        with self._tx() as db:
            env = db.execute("SELECT name FROM environments WHERE model_id = ? AND "
                             "(current_deployment_id = ? OR promoting_deployment_id = ?)",
                             (model_id, deployment_id, deployment_id)).fetchone()
            if env is not None:
                raise ConflictError(
                    f"deployment {deployment_id} serves environment {env['name']!r}; "
                    f"promote another deployment to {env['name']!r} before deleting it",
                    ident=deployment_id)
            db.execute("UPDATE environments SET previous_deployment_id = NULL "
                       "WHERE previous_deployment_id = ?", (deployment_id,))
            db.execute("DELETE FROM deployments WHERE id = ?", (deployment_id,))

    # -- environments ------------------------------------------------------------------

    @staticmethod
    def _environment(row: sqlite3.Row) -> EnvironmentRecord:
        return EnvironmentRecord(
            model_id=row["model_id"], name=row["name"], created_at=row["created_at"],
            settings=AutoscalingSettings.from_json(json.loads(row["settings"])),
            current_deployment_id=row["current_deployment_id"],
            previous_deployment_id=row["previous_deployment_id"],
            promoting_deployment_id=row["promoting_deployment_id"],
            promotion_settings=PromotionSettings.from_json(
                json.loads(row["promotion_settings"]) if row["promotion_settings"] else None),
            promotion=json.loads(row["promotion"]) if row["promotion"] else None)

    def create_environment(self, model_id: str, name: str,
                           settings: AutoscalingSettings | None = None) -> EnvironmentRecord:
        self.get_model(model_id)
        check_name(name, "name")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM environments WHERE model_id = ? AND name = ?",
                          (model_id, name)).fetchone():
                raise ConflictError(f"model {model_id} already has an environment named "
                                    f"{name!r}", ident=name)
            db.execute("INSERT INTO environments (model_id, name, created_at, settings) "
                       "VALUES (?, ?, ?, ?)",
                       (model_id, name, utc_now(),
                        json.dumps((settings or AutoscalingSettings()).to_json())))
        return self.get_environment(model_id, name)

    def get_environment(self, model_id: str, name: str) -> EnvironmentRecord:
        row = self._db.execute("SELECT * FROM environments WHERE model_id = ? AND name = ?",
                               (model_id, name)).fetchone()
        if row is None:
            raise NotFoundError(f"model {model_id!r} has no environment {name!r}",
                                kind="environment", ident=name)
        return self._environment(row)

    def list_environments(self, model_id: str | None = None) -> list[EnvironmentRecord]:
        if model_id is None:
            rows = self._db.execute("SELECT * FROM environments ORDER BY created_at, name")
        else:
            rows = self._db.execute("SELECT * FROM environments WHERE model_id = ? "
                                    "ORDER BY name != 'production', created_at, name",
                                    (model_id,))
        return [self._environment(r) for r in rows.fetchall()]

    def environments_of(self, deployment_id: str) -> list[str]:
        rows = self._db.execute("SELECT name FROM environments WHERE current_deployment_id = ? "
                                "ORDER BY name", (deployment_id,)).fetchall()
        return [r["name"] for r in rows]

    def delete_environment(self, model_id: str, name: str) -> None:
        if name == PRODUCTION:
            raise ConflictError("the production environment cannot be deleted", ident=name)
        self.get_environment(model_id, name)
        with self._tx() as db:
            db.execute("DELETE FROM environments WHERE model_id = ? AND name = ?",
                       (model_id, name))

    def set_environment_settings(self, model_id: str, name: str,
                                 settings: AutoscalingSettings) -> EnvironmentRecord:
        env = self.get_environment(model_id, name)
        with self._tx() as db:
            db.execute("UPDATE environments SET settings = ? WHERE model_id = ? AND name = ?",
                       (json.dumps(settings.to_json()), model_id, name))
            if env.current_deployment_id is not None:
                db.execute("UPDATE deployments SET settings = ? WHERE id = ?",
                           (json.dumps(settings.to_json()), env.current_deployment_id))
        return self.get_environment(model_id, name)

    def set_promotion_settings(self, model_id: str, name: str,
                               settings: PromotionSettings) -> EnvironmentRecord:
        self.get_environment(model_id, name)
        with self._tx() as db:
            db.execute("UPDATE environments SET promotion_settings = ? "
                       "WHERE model_id = ? AND name = ?",
                       (json.dumps(settings.to_json()), model_id, name))
        return self.get_environment(model_id, name)

    # -- promotion ---------------------------------------------------------------------

    def begin_promotion(self, model_id: str, env_name: str, deployment_id: str,
                        promotion: dict[str, Any] | None = None) -> EnvironmentRecord:
        """Mark a promotion in progress; the candidate inherits the environment's settings.

        One promotion per environment at a time: a second one is a conflict.
        ``promotion`` (the controller's record of it) is written in the same transaction,
        so a restart never finds a promotion without it.
        """
        self.get_deployment(model_id, deployment_id)
        with self._tx() as db:
            row = db.execute("SELECT * FROM environments WHERE model_id = ? AND name = ?",
                             (model_id, env_name)).fetchone()
            if row is None:
                raise NotFoundError(f"model {model_id!r} has no environment {env_name!r}",
                                    kind="environment", ident=env_name)
            if row["promoting_deployment_id"] is not None:
                raise ConflictError(
                    f"a promotion of deployment {row['promoting_deployment_id']} to "
                    f"{env_name!r} is already in progress; wait for it to finish",
                    ident=env_name)
            if row["current_deployment_id"] == deployment_id:
                raise ConflictError(f"deployment {deployment_id} already serves "
                                    f"{env_name!r}", ident=deployment_id)
            db.execute("UPDATE environments SET promoting_deployment_id = ?, promotion = ? "
                       "WHERE model_id = ? AND name = ?",
                       (deployment_id, json.dumps(promotion) if promotion else None,
                        model_id, env_name))
            db.execute("UPDATE deployments SET settings = ?, active = 1 WHERE id = ?",
                       (row["settings"], deployment_id))
        return self.get_environment(model_id, env_name)

    def finish_promotion(self, model_id: str, env_name: str) -> EnvironmentRecord:
        """Point the environment at the candidate; the old current becomes ``previous``."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM environments WHERE model_id = ? AND name = ?",
                             (model_id, env_name)).fetchone()
            if row is None or row["promoting_deployment_id"] is None:
                raise ConflictError(f"no promotion to {env_name!r} is in progress",
                                    ident=env_name)
            previous = row["current_deployment_id"]
            db.execute("UPDATE environments SET current_deployment_id = ?, "
                       "previous_deployment_id = ?, promoting_deployment_id = NULL, "
                       "promotion = NULL "
                       "WHERE model_id = ? AND name = ?",
                       (row["promoting_deployment_id"], previous or row["previous_deployment_id"],
                        model_id, env_name))
        return self.get_environment(model_id, env_name)

    def set_promotion(self, model_id: str, env_name: str, deployment_id: str,
                      promotion: dict[str, Any]) -> None:
        """Persist the progress of the promotion of ``deployment_id`` (and of no other)."""
        with self._tx() as db:
            db.execute("UPDATE environments SET promotion = ? WHERE model_id = ? AND "
                       "name = ? AND promoting_deployment_id = ?",
                       (json.dumps(promotion), model_id, env_name, deployment_id))

    def abort_promotion(self, model_id: str, env_name: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE environments SET promoting_deployment_id = NULL, "
                       "promotion = NULL WHERE model_id = ? AND name = ?",
                       (model_id, env_name))

    def promotions_in_progress(self) -> list[EnvironmentRecord]:
        rows = self._db.execute("SELECT * FROM environments WHERE "
                                "promoting_deployment_id IS NOT NULL").fetchall()
        return [self._environment(r) for r in rows]

    # -- chains (control.chains): a chain deployment names one deployment per chainlet --

    def create_chain(self, name: str) -> tuple[str, str]:
        check_name(name, "name")
        chain_id = new_id()
        with self._tx() as db:
            row = db.execute("SELECT id FROM chains WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return row["id"], name
            db.execute("INSERT INTO chains (id, name, created_at) VALUES (?, ?, ?)",
                       (chain_id, name, utc_now()))
        return chain_id, name

    def get_chain(self, chain_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT * FROM chains WHERE id = ? OR name = ?",
                               (chain_id, chain_id)).fetchone()
        if row is None:
            raise NotFoundError(f"no chain {chain_id!r}", kind="chain", ident=chain_id)
        return dict(row)

    def list_chains(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute("SELECT * FROM chains ORDER BY created_at")]

    def add_chain_deployment(self, chain_id: str, *, development: bool, entrypoint: str,
                             chainlets: dict[str, dict[str, str]],
                             deployment_id: str | None = None) -> dict[str, Any]:
        """Record a chain deployment (under ``deployment_id`` when the chainlets were
        told it already); a development one replaces the previous record."""
        with self._tx() as db:
            if development:
                row = db.execute("SELECT id FROM chain_deployments WHERE chain_id = ? AND "
                                 "is_development = 1", (chain_id,)).fetchone()
                if row is not None:
                    db.execute("UPDATE chain_deployments SET entrypoint = ?, chainlets = ? "
                               "WHERE id = ?", (entrypoint, json.dumps(chainlets), row["id"]))
                    return self.get_chain_deployment(chain_id, row["id"])
            dep_id = deployment_id or new_id()
            db.execute("INSERT INTO chain_deployments (id, chain_id, created_at, "
                       "is_development, entrypoint, chainlets) VALUES (?, ?, ?, ?, ?, ?)",
                       (dep_id, chain_id, utc_now(), int(development), entrypoint,
                        json.dumps(chainlets)))
        return self.get_chain_deployment(chain_id, dep_id)

    def get_chain_deployment(self, chain_id: str, deployment_id: str) -> dict[str, Any]:
        if deployment_id == DEVELOPMENT:
            row = self._db.execute("SELECT * FROM chain_deployments WHERE chain_id = ? AND "
                                   "is_development = 1", (chain_id,)).fetchone()
        else:
            row = self._db.execute("SELECT * FROM chain_deployments WHERE chain_id = ? AND "
                                   "id = ?", (chain_id, deployment_id)).fetchone()
        if row is None:
            raise NotFoundError(f"chain {chain_id} has no deployment {deployment_id!r}",
                                kind="chain deployment", ident=deployment_id)
        return {**dict(row), "is_development": bool(row["is_development"]),
                "chainlets": json.loads(row["chainlets"])}

    def list_chain_deployments(self, chain_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT id FROM chain_deployments WHERE chain_id = ? "
                                "ORDER BY created_at", (chain_id,)).fetchall()
        return [self.get_chain_deployment(chain_id, r["id"]) for r in rows]
