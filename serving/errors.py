"""Errors of the serving runtime; all derive from :class:`manifests.errors.BdnError`.

Malformed safetensors files raise :class:`manifests.errors.SafetensorsError` (which names
the file, tensor and byte offset) from wherever they are detected, so a caller catches
one type for "this file is bad" whether the header parser or the loader found it. The
classes here cover what is specific to serving: weights that never arrived, a model
folder that cannot be run, and a model whose own code failed.
"""

from __future__ import annotations

from manifests.errors import BdnError, SafetensorsError

__all__ = [
    "ModelDirError",
    "ModelLoadError",
    "ReadinessTimeout",
    "SafetensorsError",
    "ServeOptionsError",
    "ServingError",
    "WeightsFileError",
    "WeightsUnavailableError",
]


class ServingError(BdnError):
    """Root of the serving runtime's own errors."""


class WeightsUnavailableError(ServingError):
    """Bytes the loader waits for did not arrive: the pull failed, ended, or timed out.

    ``path`` names the file, ``begin``/``end`` the byte range that was still missing.
    """

    def __init__(self, message: str, *, path: str = "", begin: int | None = None,
                 end: int | None = None) -> None:
        where = path
        if begin is not None and end is not None:
            where = f"{path} bytes [{begin}, {end})" if path else f"bytes [{begin}, {end})"
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.begin = begin
        self.end = end


class ReadinessTimeout(WeightsUnavailableError):
    """A wait for bytes ran out of time (the pull may still be going)."""


class WeightsFileError(ServingError, ValueError):
    """The set of weight files is wrong: none found, a bad index, a name in two shards."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class ModelDirError(ServingError, ValueError):
    """A model folder cannot be run: no ``model/model.py``, no ``class Model``, ..."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class ModelLoadError(ServingError):
    """The model's own ``__init__`` or ``load()`` raised; ``traceback`` is its code only."""

    def __init__(self, message: str, *, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


class ServeOptionsError(ServingError, ValueError):
    """A ``bdn serve`` limit is out of range; ``field`` names the option."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SecretNotFound(ServingError):
    """The model read a secret that ``config.yaml`` does not declare under ``secrets:``,
    or that has no value on this node. As in Truss, this is not a ``KeyError``: an
    undeclared secret is a bug in the model folder, and ``secrets.get(name)`` must not
    quietly answer ``None`` for it. ``name`` is the secret's name (never its value)."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name
