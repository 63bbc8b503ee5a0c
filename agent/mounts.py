"""Mounts: read-only trees of hardlinks into the node cache's file store.

A mount is a directory of hardlinks to complete, verified files under
``<cache>/files/``, so every replica on the node shares one copy of the bytes, a mount
costs no disk and appears in microseconds, and duplicate files of a model are one inode.
Files are read-only (the store's inode has no write bits) and a finished mount's
directories are sealed ``0555``.

Safety: :func:`check_mount_paths` runs over every path of a pull *before anything is
written anywhere*: the mount directory and every existing component under it are
``lstat``-ed and a symlink or a non-directory in the way is refused — a planted symlink
can never steer a link outside the mount. :func:`link_file` re-checks while creating
(``bdn.fsutil.safe_target``), because the tree could change between check and write.
A file appears in a mount whole or not at all: ``link(2)`` creates the name atomically
for an already complete inode; the cross-device fallback (a mount on another file
system than the node cache) copies into an unnamed ``O_TMPFILE`` inode and names it
when complete (:func:`copy_across`); where a file system lacks ``O_TMPFILE``, a temporary
name a killed agent leaves behind is removed at the next start
(:func:`sweep_copy_leftovers`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from agent.errors import MountError
from bdn.errors import PathError
from bdn.fsutil import copy_file_atomic, refuse_unless_dir, safe_target, sweep_temps
from cache.node_errors import DiskFullError
from manifests.paths import check_relative_path

SEALED_DIR_MODE = 0o555
OPEN_DIR_MODE = 0o755


def check_mount_path(mount: str) -> Path:
    """An absolute, normalised mount path that is not itself a symlink."""
    if not isinstance(mount, str) or not os.path.isabs(mount) or "\x00" in mount:
        raise PathError(f"mount {mount!r} must be an absolute path", field="mount")
    if ".." in mount.split("/"):
        raise PathError(f"mount {mount!r} must not contain '..'", field="mount")
    p = Path(os.path.normpath(mount))
    if p == Path("/"):
        raise PathError("mount cannot be /", field="mount")
    with contextlib.suppress(FileNotFoundError):
        refuse_unless_dir(os.lstat(p), p, "mount", field="mount")
    return p


def check_mount_paths(mount: str, rels: Iterable[str]) -> Path:
    """Refuse unsafe paths or planted symlinks under ``mount``; writes nothing."""
    root = check_mount_path(mount)
    for rel in rels:
        check_relative_path(rel)
        cur = root
        parts = rel.split("/")
        for i, seg in enumerate(parts):
            cur = cur / seg
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                break
            except NotADirectoryError:
                raise PathError(f"{rel!r}: a component of {cur} is not a directory",
                                field="path") from None
            last = i == len(parts) - 1
            refuse_unless_dir(st, cur, f"{rel!r}:", field="path", is_last=last)
            if last and not stat.S_ISREG(st.st_mode):
                raise PathError(f"{rel!r}: {cur} exists and is not a regular file",
                                field="path")
    return root


def link_file(mount: Path, rel: str, src: Path) -> Path:
    """Expose ``src`` (a complete node-cache file) at ``mount/rel``; idempotent."""
    mount.mkdir(parents=True, exist_ok=True)
    _open_dirs(mount, rel)
    target = safe_target(mount, rel)
    src_st = os.stat(src)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(target)
        if st.st_ino == src_st.st_ino and st.st_dev == src_st.st_dev:
            return target
        if st.st_size == src_st.st_size and _same_bytes(target, src):
            return target  # a cross-device copy made earlier
        raise MountError(f"{target} already exists with other content; refusing to replace "
                         "a file this agent did not place", path=str(target))
    try:
        os.link(src, target)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        copy_across(src, target, src_st)
    return target


def copy_across(src: Path, target: Path, src_st: os.stat_result) -> None:
    """The cross-device fallback of :func:`link_file`: a copy that gets its name only
    when complete (``bdn.fsutil.copy_file_atomic``), so nothing partial is ever visible
    in the mount, even after ``kill -9``. A full file system under the mount is the
    node's clear "disk full" (bytes needed, path), not a bare ``OSError``."""
    try:
        copy_file_atomic(src, target, stat.S_IMODE(src_st.st_mode))
    except FileExistsError:
        # Another pull placed it between our check and the copy: fine if the same bytes.
        if not _same_bytes(target, src):
            raise MountError(f"{target} already exists with other content; refusing to "
                             "replace a file this agent did not place",
                             path=str(target)) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"no space to copy {src_st.st_size:,d} bytes into the mount at {target} "
                f"(another file system than the node cache); free space there",
                path=str(target), needed=src_st.st_size) from None
        raise


def sweep_copy_leftovers(mount: Path, rels: Iterable[str]) -> int:
    """Remove what an interrupted cross-device copy left for these files of ``mount``
    (temporary names of a dead process, ``bdn.fsutil.temp_name``); run at agent start.
    Nothing else is touched. Returns how many went."""
    by_dir: dict[Path, set[str]] = {}
    for rel in rels:
        try:
            check_relative_path(rel)
        except PathError:
            continue
        target = mount / rel
        by_dir.setdefault(target.parent, set()).add(target.name)
    if not os.path.isdir(mount) or os.path.islink(mount):
        return 0
    removed = 0
    for folder, names in by_dir.items():
        if _real_dir_under(mount, folder):
            removed += sweep_temps(folder, names)
    return removed


def _real_dir_under(mount: Path, folder: Path) -> bool:
    """Every component from ``mount`` to ``folder`` is a directory, none a symlink."""
    cur = mount
    try:
        for seg in folder.relative_to(mount).parts:
            cur = cur / seg
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                return False
    except OSError:
        return False
    return True


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _open_dirs(mount: Path, rel: str) -> None:
    """Re-open sealed directories on the way to ``rel`` (a second pull into a mount)."""
    cur = mount
    for seg in ["", *rel.split("/")[:-1]]:
        cur = cur / seg if seg else cur
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(cur)
            if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) != OPEN_DIR_MODE:
                os.chmod(cur, OPEN_DIR_MODE)


def seal(mount: Path) -> None:
    """Make every directory of a finished mount read-only (deepest first)."""
    for dirpath, _dirs, _files in os.walk(mount, topdown=False):
        if not os.path.islink(dirpath):
            os.chmod(dirpath, SEALED_DIR_MODE)


def release(mount: Path, rels: Iterable[str]) -> int:
    """Remove the files this agent placed, then empty directories; returns files removed."""
    if not os.path.isdir(mount) or os.path.islink(mount):
        return 0
    for dirpath, _dirs, _files in os.walk(mount):
        if not os.path.islink(dirpath):
            os.chmod(dirpath, OPEN_DIR_MODE)
    removed = 0
    for rel in rels:
        try:
            check_relative_path(rel)
        except PathError:
            continue
        target = mount / rel
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            if stat.S_ISREG(os.lstat(target).st_mode):
                os.unlink(target)
                removed += 1
    for dirpath, _dirs, _files in os.walk(mount, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)
    return removed
