"""Filesystem helpers for writing under a root that a manifest names paths in.

Every write of a manifest path goes through :func:`safe_target`: the path string is
checked (relative, normalised) and every directory between the root and the file is
created or checked with ``lstat`` so that a symlink planted anywhere under the root is
refused *before* anything is written — a path can never be steered outside the root.
Small records (resume state) are replaced whole with :func:`write_json_atomic`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from bdn.errors import PathError
from manifests.paths import check_relative_path


def refuse_unless_dir(st: os.stat_result, path: Path, label: str, *, field: str,
                      is_last: bool = False) -> None:
    """Refuse a path (``st`` from ``lstat``) that is a symlink, or, unless it is the last
    component (checked by its caller), not a directory: nothing may be written through
    it. ``label`` starts the message ("mount", or the relative path asked for)."""
    if stat.S_ISLNK(st.st_mode):
        raise PathError(f"{label} {path} is a symlink; refusing to write through it",
                        field=field)
    if not is_last and not stat.S_ISDIR(st.st_mode):
        raise PathError(f"{label} {path} exists and is not a directory", field=field)


def safe_target(root: Path, rel: str) -> Path:
    """Create the parents of ``root/rel`` (refusing symlinks) and return the path.

    Raises :class:`PathError` if ``rel`` is unsafe, if any component under ``root`` is a
    symlink or a non-directory, or if the target itself is a symlink or a directory.
    """
    check_relative_path(rel)
    parts = rel.split("/")
    cur = root
    for seg in parts[:-1]:
        cur = cur / seg
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(cur, 0o755)
            st = os.lstat(cur)
        refuse_unless_dir(st, cur, f"{rel!r}:", field="path")
    target = cur / parts[-1]
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return target
    if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
        raise PathError(f"{rel!r}: {target} exists and is a symlink or directory; refusing "
                        "to replace it", field="path")
    return target


def check_root(root: Path) -> Path:
    """Create ``root`` if needed; refuse it if it is itself a symlink."""
    root = Path(os.path.abspath(root))
    root.mkdir(parents=True, exist_ok=True)
    if os.path.islink(root):
        raise PathError(f"{root} is a symlink; give the real directory", field="root")
    return root


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.bdn-tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_json_atomic(path: Path, doc: Any) -> None:
    """Replace ``path`` with ``doc`` as JSON: written beside it, then renamed, so a
    reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def contained_root(path: str | os.PathLike[str], roots: tuple[str, ...]) -> str | None:
    """The first of ``roots`` (real paths) that contains ``path`` once every symlink and
    ``..`` in it is resolved, or None: the check for reading only under allowed folders."""
    real = os.path.realpath(path)
    for root in roots:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return root
    return None
