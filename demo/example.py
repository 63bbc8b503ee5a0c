"""The demo's example model folder (``demo/minilm``), shipped inside the package.

The folder is package data of ``demo`` ([tool.setuptools.package-data] in pyproject.toml),
so ``bdn-demo`` from an installed wheel finds it without the repository. It is read with
:mod:`importlib.resources` and copied into the demo's work folder before use, rather than
served in place: ``bdn serve`` and ``bdn push`` take a folder path, a package may sit in a
zip or a read-only site-packages, and serving imports ``model/model.py``, which would
write bytecode into the installed package.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from bdn.fsutil import temp_name

EXAMPLE_NAME = "minilm"
# Written by the interpreter when a model folder is imported; never part of the example.
SKIPPED_NAMES = frozenset({"__pycache__"})


def example_folder() -> Traversable:
    """The example folder inside the installed ``demo`` package."""
    return files("demo") / EXAMPLE_NAME


def origin() -> str:
    """Where the example folder is read from, for the demo's report."""
    return str(example_folder())


def materialize(target: Path) -> Path:
    """Copy the example folder to ``target`` (which must not exist) and return it.

    The copy is made under a temporary name beside ``target`` and renamed into place, so
    ``target`` is either absent or complete.
    """
    if target.exists():
        raise FileExistsError(f"{target} exists; the demo copies its example into a new folder")
    tmp = temp_name(target)
    try:
        _copy(example_folder(), tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _copy(src: Traversable, dst: Path) -> None:
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name in SKIPPED_NAMES:
            continue
        if entry.is_dir():
            _copy(entry, dst / entry.name)
        else:
            (dst / entry.name).write_bytes(entry.read_bytes())
