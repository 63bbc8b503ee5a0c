"""Running a Truss-like model folder: import ``model/model.py``, build, load, predict.

A model folder is ``config.yaml`` (read with :func:`bdn.config.load_model_config`) and
``model/model.py`` defining ``class Model`` with ``__init__(**kwargs)``, ``load()`` and
``predict(model_input)`` (sync or async; optional ``preprocess``/``postprocess``). The
constructor receives what Truss passes — ``config`` (the raw config dict), ``data_dir``,
``secrets``, ``environment`` — plus bdn's ``weights``: a :class:`Weights` handle that
knows where each ``weights:`` entry's files are and loads them with the streaming loader,
so ``load()`` can start while the agent is still writing. Only the keyword arguments the
constructor accepts are passed (as Truss does), so plain Truss models run unchanged.

This module owns the cold-start accounting: wall time of the model's ``load()`` split
into waiting for weights (the loader stood still for bytes), loading to the device (the
loader's remaining time) and model init (everything else in ``__init__``/``load()``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from bdn.config import ModelConfig, load_model_config
from bdn.secrets import register_secret_value
from serving.errors import ModelDirError, ModelLoadError
from serving.readiness import FilesReady, ReadinessSource

MODEL_MODULE_REL = Path("model") / "model.py"
MODEL_CLASS = "Model"
SECRETS_DIR_DEFAULT = "/secrets"
# Truss passes these to Model.__init__; bdn adds ``weights``.
MODEL_KWARGS = ("config", "data_dir", "secrets", "environment", "weights")


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


class Secrets(Mapping[str, str]):
    """Secret values by name, read on access from ``$BDN_SECRETS_DIR/<name>`` (Truss's
    ``/secrets`` mount) or ``$BDN_SECRET_<NAME>``. Never printed: ``repr`` shows names."""

    def __init__(self, names: Mapping[str, Any]) -> None:
        self._names = tuple(names)
        self._dir = Path(os.environ.get("BDN_SECRETS_DIR", SECRETS_DIR_DEFAULT))

    def __getitem__(self, name: str) -> str:
        p = self._dir / name
        if "/" not in name and p.is_file():
            value = p.read_text(encoding="utf-8").strip()
            register_secret_value(value)  # so the log scrubber knows it
            return value
        env = os.environ.get("BDN_SECRET_" + name.upper().replace("-", "_").replace(".", "_"))
        if env is not None:
            register_secret_value(env)
            return env
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"Secrets({list(self._names)!r})"


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
        if not (self.model_dir / MODEL_MODULE_REL).is_file():
            raise ModelDirError(f"no {MODEL_MODULE_REL} in the model folder",
                                path=str(self.model_dir))
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

    def _import(self) -> ModuleType:
        path = self.model_dir / MODEL_MODULE_REL
        # The model's own folder first, so model.py can import its sibling modules.
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location("bdn_user_model", path)
        if spec is None or spec.loader is None:
            raise ModelDirError("cannot import", path=str(path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    def _kwargs(self, cls: type) -> dict[str, Any]:
        env_name = os.environ.get("BDN_ENVIRONMENT")
        environment = None
        if env_name:
            try:
                parsed = json.loads(env_name)
                environment = parsed if isinstance(parsed, dict) else {"name": env_name}
            except ValueError:
                environment = {"name": env_name}
        available = {
            "config": self.config.raw,
            "data_dir": self.model_dir / "data",
            "secrets": Secrets(self.config.secrets),
            "environment": environment,
            "weights": self.weights,
        }
        params = inspect.signature(cls.__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return available
        return {k: v for k, v in available.items() if k in params}

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
            module = self._import()
            cls = getattr(module, MODEL_CLASS, None)
            if not isinstance(cls, type):
                raise ModelDirError(f"{MODEL_MODULE_REL} defines no class {MODEL_CLASS}",
                                    path=str(self.model_dir))
            if not callable(getattr(cls, "predict", None)):
                raise ModelDirError(f"{MODEL_CLASS} has no predict() method",
                                    path=str(self.model_dir))
            model = cls(**self._kwargs(cls))
            if callable(getattr(model, "load", None)):
                model.load()
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
