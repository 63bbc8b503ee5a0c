"""Running a Truss model folder: import ``model/model.py``, build, load, predict.

A model folder is ``config.yaml`` (read with :func:`bdn.config.load_model_config`) and
``model/model.py`` defining ``class Model`` with ``load()`` and ``predict(model_input)``
(sync or async; optional ``preprocess``/``postprocess``), laid out as Truss lays it out
(``model_module_dir``, ``model_class_filename``, ``model_class_name``, ``packages/`` and
``external_package_dirs`` importable, ``data/`` as ``data_dir``), so a folder that
``truss push`` accepts runs unchanged.

The model is built as Truss builds it: which keyword arguments to pass is decided from
the signature of the class itself (``inspect.signature(cls)``, so a class without an
``__init__`` of its own gets none), each of ``config`` (the raw config dict),
``data_dir``, ``secrets``, ``environment`` (from ``$BDN_ENVIRONMENT``; None when unset)
and ``lazy_data_resolver`` only when accepted by name or ``**kwargs`` — plus bdn's
``weights``: a :class:`Weights` handle that knows where each ``weights:`` entry's files
are and loads them with the streaming loader, so ``load()`` can start while the agent is
still writing. ``setup_environment(environment)``, when defined, runs before ``load()``
once an environment is known (as in Truss). A secret read through ``secrets`` that
``config.yaml`` does not declare raises :class:`SecretNotFound`, as in Truss.

``requirements`` are recorded, never installed: a node is shared by many models, and
installing into the server's environment would change what the others import. Those
not installed here are listed at load, and an import failure names them.

This module owns the cold-start accounting: wall time of the model's ``load()`` split
into waiting for weights (the loader stood still for bytes), loading to the device (the
loader's remaining time) and model init (everything else in ``__init__``/``load()``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from bdn import settings
from bdn.config import ModelConfig, load_model_config
from bdn.secrets import register_secret_value
from serving.errors import ModelDirError, ModelLoadError, SecretNotFound
from serving.readiness import FilesReady, ReadinessSource

log = logging.getLogger("bdn.serving.runtime")

SECRETS_DIR_DEFAULT = "/secrets"
# Truss passes these to Model.__init__ when accepted; bdn adds ``weights``.
MODEL_KWARGS = ("config", "data_dir", "secrets", "environment", "lazy_data_resolver",
                "weights")
_REQUIREMENT_NAME_RE = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class WeightsMount:
    """One ``weights:`` entry: its source, the configured mount, and the real folder."""

    source: str
    mount_location: str
    path: Path


class Weights:
    """The model's handle on its weights (passed to ``Model.__init__`` as ``weights``).

    ``weights.dir`` is the first entry's folder; ``weights.load()`` loads it with the
    streaming loader onto ``weights.device``, waiting for bytes through the server's
    readiness source (the node agent's events, or none when files are already there).
    """

    def __init__(self, mounts: tuple[WeightsMount, ...], device: str,
                 readiness: ReadinessSource | None = None) -> None:
        self.mounts = mounts
        self.device = device
        self.readiness = readiness or FilesReady()

    @property
    def dir(self) -> Path:
        if not self.mounts:
            raise ModelDirError("config.yaml has no weights: entry, and no --weights-dir "
                                "was given")
        return self.mounts[0].path

    def _source(self, what: str | os.PathLike[str] | list[str] | None) -> Any:
        if what is None:
            return str(self.dir)
        if isinstance(what, list | tuple):
            return [str(self.dir / p) for p in what]
        return str(self.dir / what)

    def load(self, what: str | os.PathLike[str] | list[str] | None = None,
             **options: Any) -> dict[str, Any]:
        """All tensors of ``what`` (default: the first mount's folder) as a dict.

        ``what`` is relative to :attr:`dir` (absolute paths work too); ``options`` are
        :class:`serving.loader.LoadOptions` fields (``device`` defaults to the server's).
        """
        from serving.loader import load

        options.setdefault("device", self.device)
        return load(self._source(what), readiness=self.readiness, **options)

    def iter(self, what: str | os.PathLike[str] | list[str] | None = None,
             **options: Any) -> Iterator[tuple[str, Any]]:
        """Like :meth:`load`, yielding ``(name, tensor)`` as each is complete."""
        from serving.loader import iter_tensors

        options.setdefault("device", self.device)
        return iter_tensors(self._source(what), readiness=self.readiness, **options)


def _secret_missing(name: str) -> str:
    return (f"Secret {name!r} not found. Please ensure that it is declared in the 'secrets' "
            f"section of config.yaml, and that its value is at $BDN_SECRETS_DIR/{name} (the "
            f"/secrets mount) or in $BDN_SECRET_<NAME>")


class Secrets(Mapping[str, str]):
    """Secret values by name, read on access from ``$BDN_SECRETS_DIR/<name>`` (Truss's
    ``/secrets`` mount) or ``$BDN_SECRET_<NAME>``, else the placeholder ``config.yaml``
    gives. Only declared names resolve: any other raises :class:`SecretNotFound` (as
    Truss's ``Secrets`` does), so does a declared one without a value. Never printed:
    ``repr`` shows names."""

    def __init__(self, names: Mapping[str, Any]) -> None:
        self._declared = dict(names)
        self._names = tuple(names)
        self._dir = Path(settings.SECRETS_DIR.get() or SECRETS_DIR_DEFAULT)

    def __getitem__(self, name: str) -> str:
        if name not in self._declared:
            raise SecretNotFound(_secret_missing(name), name=name)
        p = self._dir / name
        if "/" not in name and p.is_file():
            value = p.read_text(encoding="utf-8").strip()
            register_secret_value(value)  # so the log scrubber knows it
            return value
        env = settings.secret_from_env(name)
        if env is not None:
            register_secret_value(env)
            return env
        default = self._declared[name]
        if isinstance(default, str) and default:
            return default
        raise SecretNotFound(_secret_missing(name), name=name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"Secrets({list(self._names)!r})"


class LazyDataResolver:
    """What Truss passes as ``lazy_data_resolver``: ``fetch()`` makes the model's data
    available and answers its folder. bdn has no ``external_data`` downloads (weights are
    what bdn delivers), so the data is what the folder's ``data/`` holds."""

    def __init__(self, data_dir: Path, external_data: Any) -> None:
        self.data_dir = data_dir
        self._external = external_data

    def fetch(self) -> Path:
        if self._external:
            raise ModelLoadError("config.yaml's external_data is not downloaded by bdn: list "
                                 "those files under weights: or put them in the data folder")
        return self.data_dir

    def raise_if_not_collected(self) -> None:
        """Truss's check that ``fetch()`` was called; nothing to collect here."""


def missing_requirements(requirements: tuple[str, ...]) -> list[str]:
    """The requirement lines whose distribution is not installed in this interpreter
    (by name only: versions are the image's business, and a pin that differs still
    imports)."""
    missing = []
    for line in requirements:
        m = _REQUIREMENT_NAME_RE.match(line)
        if m is None or line.lstrip().startswith(("#", "-")):
            continue
        try:
            importlib.metadata.distribution(m.group(1))
        except importlib.metadata.PackageNotFoundError:
            missing.append(line.strip())
    return missing


def environment_from_env() -> dict[str, Any] | None:
    """The deployment's environment from ``$BDN_ENVIRONMENT`` (JSON object, or a bare
    name), None when unset."""
    return settings.ENVIRONMENT.get()


def _accepts(params: Mapping[str, inspect.Parameter], name: str) -> bool:
    p = params.get(name)
    if p is not None and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    inspect.Parameter.KEYWORD_ONLY):
        return True
    return any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())


@dataclass
class ColdStart:
    """Phases of one cold start in seconds; ``None`` until measured."""

    waiting_for_weights_s: float = 0.0
    loading_to_device_s: float = 0.0
    model_init_s: float | None = None
    total_s: float | None = None
    bytes_loaded: int = 0
    loads: list[dict[str, Any]] = field(default_factory=list)


def model_traceback(exc: BaseException, model_root: Path) -> str:
    """The traceback from the first frame in the model's folder on (no server frames)."""
    root = str(model_root.resolve())
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and not os.path.abspath(
            tb.tb_frame.f_code.co_filename).startswith(root + os.sep):
        tb = tb.tb_next
    if tb is None:  # failed before reaching model code: show the exception alone
        return "".join(traceback.format_exception_only(type(exc), exc))
    return "".join(traceback.format_exception(type(exc), exc, tb))


class ModelRuntime:
    """One model folder: config, the imported ``Model``, its load state and phases."""

    def __init__(self, model_dir: str | os.PathLike[str], *, device: str,
                 weights_dir: str | os.PathLike[str] | None = None,
                 readiness: ReadinessSource | None = None) -> None:
        self.model_dir = Path(model_dir).resolve()
        if not self.model_dir.is_dir():
            raise ModelDirError("model folder does not exist", path=str(self.model_dir))
        self.config: ModelConfig = load_model_config(self.model_dir)
        self.module_path = self._inside(Path(self.config.model_module_dir)
                                        / self.config.model_class_filename)
        if not self.module_path.is_file():
            rel = self.module_path.relative_to(self.model_dir)
            raise ModelDirError(f"no {rel} in the model folder", path=str(self.model_dir))
        self.data_dir = self._inside(Path(self.config.data_dir))
        self.requirements_missing = missing_requirements(self.config.requirements)
        mounts = [WeightsMount(e.source.uri, e.mount_location, Path(e.mount_location))
                  for e in self.config.weights]
        if weights_dir is not None:
            wd = Path(weights_dir).resolve()
            if mounts:
                mounts[0] = WeightsMount(mounts[0].source, mounts[0].mount_location, wd)
            else:
                mounts.append(WeightsMount("", "", wd))
        self.readiness = readiness or FilesReady()
        self.weights = Weights(tuple(mounts), device, self.readiness)
        self.device = device
        self.cold_start = ColdStart()
        self.model: Any = None
        self.ready = False
        self.predict_is_async = False
        self.environment: dict[str, Any] | None = None

    def _inside(self, rel: Path) -> Path:
        """``rel`` under the model folder; refused when it resolves outside it."""
        p = (self.model_dir / rel).resolve()
        if p != self.model_dir and not p.is_relative_to(self.model_dir):
            raise ModelDirError(f"{rel} is outside the model folder", path=str(self.model_dir))
        return p

    def set_device(self, device: str) -> None:
        """Where ``weights.load()`` puts tensors by default."""
        self.device = device
        self.weights.device = device

    def use_readiness(self, readiness: ReadinessSource) -> None:
        """Wait for weights through ``readiness`` (e.g. the agent's event stream)."""
        self.readiness = readiness
        self.weights.readiness = readiness

    @property
    def predict_concurrency(self) -> int:
        return self.config.predict_concurrency

    def _package_dirs(self) -> list[Path]:
        """Folders Truss puts on ``sys.path``: ``packages/`` (``bundled_packages_dir``) and
        each of ``external_package_dirs`` (relative to the model folder, as Truss has
        them; they may lie outside it, since sharing code between folders is their
        purpose, but must exist)."""
        dirs = []
        bundled = self._inside(Path(self.config.bundled_packages_dir))
        if bundled.is_dir():
            dirs.append(bundled)
        for d in self.config.external_package_dirs:
            p = (self.model_dir / d).resolve()
            if not p.is_dir():
                raise ModelDirError(f"external_package_dirs names {d}, which is not a folder",
                                    path=str(self.model_dir))
            dirs.append(p)
        return dirs

    def _import(self) -> ModuleType:
        path = self.module_path
        # The model's own folder first, so model.py can import its sibling modules; then
        # the package folders.
        for d in reversed([path.parent, *self._package_dirs()]):
            if str(d) not in sys.path:
                sys.path.insert(0, str(d))
        spec = importlib.util.spec_from_file_location("bdn_user_model", path)
        if spec is None or spec.loader is None:
            raise ModelDirError("cannot import", path=str(path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except ModuleNotFoundError as e:
            if self.requirements_missing:
                raise ModelLoadError(
                    f"model import failed: {e}; config.yaml requires "
                    f"{', '.join(self.requirements_missing)}, not installed on this node "
                    "(bdn does not install requirements: use an image that has them)",
                    traceback=model_traceback(e, self.model_dir)) from e
            raise
        return module

    def _kwargs(self, cls: type) -> dict[str, Any]:
        available = {
            "config": self.config.raw,
            "data_dir": self.data_dir,
            "secrets": Secrets(self.config.secrets),
            "environment": self.environment,
            "lazy_data_resolver": LazyDataResolver(self.data_dir,
                                                   self.config.raw.get("external_data")),
            "weights": self.weights,
        }
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):  # a C-level constructor: nothing to go by
            return {}
        return {k: available[k] for k in MODEL_KWARGS if _accepts(params, k)}

    def _check_weights_present(self) -> None:
        if not isinstance(self.readiness, FilesReady):
            return
        for m in self.weights.mounts:
            if not m.path.is_dir():
                what = f"weights of {m.source}" if m.source else "weights"
                raise ModelLoadError(
                    f"{what} are not at {m.path}: pull them there first (bdn pull), "
                    "or pass --weights-dir DIR")

    def load(self) -> None:
        """Import, construct and ``load()`` the model; record the cold start phases.

        Raises :class:`ModelLoadError` with the model-only traceback on any failure.
        """
        from serving import loader

        t0 = time.perf_counter()
        stats: list[loader.LoadStats] = []
        lock = threading.Lock()

        def on_load(s: loader.LoadStats) -> None:
            with lock:
                stats.append(s)

        loader.add_stats_listener(on_load)
        try:
            for k, v in self.config.environment_variables.items():
                os.environ.setdefault(k, v)
            self._check_weights_present()
            if self.requirements_missing:
                log.warning("config.yaml requires %s, not installed on this node (bdn "
                            "records requirements but does not install them)",
                            ", ".join(self.requirements_missing))
            self.environment = environment_from_env()
            module = self._import()
            name = self.config.model_class_name
            cls = getattr(module, name, None)
            rel = self.module_path.relative_to(self.model_dir)
            if not isinstance(cls, type):
                raise ModelDirError(f"{rel} defines no class {name}", path=str(self.model_dir))
            if not callable(getattr(cls, "predict", None)):
                raise ModelDirError(f"{name} has no predict() method", path=str(self.model_dir))
            model = cls(**self._kwargs(cls))
            setup = getattr(model, "setup_environment", None)
            if callable(setup) and self.environment is not None:
                # Truss calls it before load() once an environment is known.
                result = setup(self.environment)
                if inspect.isawaitable(result):
                    asyncio.run(_awaited(result))
            if callable(getattr(model, "load", None)):
                result = model.load()
                if inspect.isawaitable(result):  # an async load(): run to its end here
                    asyncio.run(_awaited(result))
        except (ModelLoadError, ModelDirError):
            raise
        except BaseException as e:
            tb = model_traceback(e, self.model_dir)
            raise ModelLoadError(f"model load failed: {type(e).__name__}: {e}",
                                 traceback=tb) from e
        finally:
            loader.remove_stats_listener(on_load)
        total = time.perf_counter() - t0
        cs = self.cold_start
        cs.waiting_for_weights_s = sum(s.waiting_s for s in stats)
        cs.loading_to_device_s = sum(s.loading_s for s in stats)
        cs.model_init_s = max(0.0, total - sum(s.wall_s for s in stats))
        cs.total_s = total
        cs.bytes_loaded = sum(s.bytes for s in stats)
        cs.loads = [{"strategy": s.strategy, "files": s.files, "tensors": s.tensors,
                     "bytes": s.bytes, "wall_s": round(s.wall_s, 6),
                     "waiting_s": round(s.waiting_s, 6)} for s in stats]
        self.model = model
        self.predict_is_async = inspect.iscoroutinefunction(model.predict)
        self.ready = True


async def _awaited(result: Any) -> Any:
    return await result
