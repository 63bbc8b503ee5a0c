"""Filesystem helpers for writing under a root that a manifest names paths in.

Every write of a manifest path goes through :func:`safe_target`: the path string is
checked (relative, normalised) and every directory between the root and the file is
created or checked with ``lstat`` so that a symlink planted anywhere under the root is
refused *before* anything is written — a path can never be steered outside the root.
Small records (resume state) are replaced whole with :func:`write_json_atomic`.

Temporary names (:func:`temp_name`) carry ``.bdn-tmp-<pid>-`` so that the leftovers of a
process killed mid-write are recognisable as bdn's and as dead (:func:`sweep_temps`), and
nothing else is ever taken for one. A whole-file copy onto another file system
(:func:`copy_file_atomic`, where ``link(2)`` or ``copy_file_range`` say ``EXDEV``) is
written into an anonymous ``O_TMPFILE`` inode and given its name only when complete, so
a reader never sees it partial and a ``kill -9`` leaves nothing behind at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
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


def safe_target(root: Path, rel: str, *, created: list[Path] | None = None) -> Path:
    """Create the parents of ``root/rel`` (refusing symlinks) and return the path.

    Raises :class:`PathError` if ``rel`` is unsafe, if any component under ``root`` is a
    symlink or a non-directory, or if the target itself is a symlink or a directory.
    ``created`` receives each directory this call made (outermost first), so a caller
    that must later remove only what it created can record them.
    """
    check_relative_path(rel)
    parts = rel.split("/")
    cur = root
    for seg in parts[:-1]:
        cur = cur / seg
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            try:
                os.mkdir(cur, 0o755)
                if created is not None:
                    created.append(cur)
            except FileExistsError:
                pass
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


TEMP_MARKER = ".bdn-tmp-"
# ``.<name>.bdn-tmp-<pid>-<8 hex>``: what temp_name makes, and all sweep_temps removes.
_TEMP_RE = re.compile(r"\.(?P<name>.+)\.bdn-tmp-(?P<pid>[0-9]+)-[0-9a-f]{8}")
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
COPY_BLOCK_BYTES = 4 * 1024 * 1024


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a temp name's owner)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def dead_temp(name: str, targets: Iterable[str] | None = None) -> bool:
    """Whether ``name`` is a :func:`temp_name` whose process is gone (and, given
    ``targets``, the temporary of one of those file names)."""
    m = _TEMP_RE.fullmatch(name)
    if m is None or (targets is not None and m["name"] not in set(targets)):
        return False
    pid = int(m["pid"])
    return pid != os.getpid() and not pid_alive(pid)


def sweep_temps(folder: Path, targets: Iterable[str] | None = None) -> int:
    """Remove the temporaries dead processes left in ``folder`` (only names
    :func:`temp_name` makes, optionally only for ``targets``); returns how many.

    A sealed (read-only) folder is opened for the removal and sealed again.
    """
    wanted = None if targets is None else set(targets)
    # Best effort (a start must not fail over a folder it cannot read or change): what
    # stays is tried again at the next start.
    try:
        names = [e.name for e in os.scandir(folder)
                 if e.is_file(follow_symlinks=False) and dead_temp(e.name, wanted)]
        if not names:
            return 0
        mode = stat.S_IMODE(os.lstat(folder).st_mode)
        reopen = not mode & stat.S_IWUSR
        if reopen:
            os.chmod(folder, mode | stat.S_IWUSR)
    except OSError:
        return 0
    removed = 0
    try:
        for name in names:
            try:
                os.unlink(folder / name)
            except OSError:
                continue
            removed += 1
    finally:
        if reopen:
            with contextlib.suppress(OSError):
                os.chmod(folder, mode)
    return removed


def _load_linkat() -> Callable[..., int] | None:
    # Python's os.link cannot follow /proc/self/fd/N (it ignores follow_symlinks on
    # Linux before 3.14): linkat(AT_SYMLINK_FOLLOW) names an O_TMPFILE inode.
    try:
        fn = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_linkat = _load_linkat()


def _name_tmpfile(fd: int, target: Path) -> None:
    assert _linkat is not None
    if _linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(target),
               _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def copy_file_atomic(src: Path, target: Path, mode: int) -> None:
    """Copy ``src`` to the absent ``target`` (another file system is fine): complete with
    ``mode`` before it has its name. Raises ``FileExistsError`` if ``target`` appeared.

    First choice: an ``O_TMPFILE`` inode in ``target``'s folder, named by ``linkat`` once
    written — invisible until then, and freed by the kernel if the process dies. Where
    the file system has no ``O_TMPFILE``: a :func:`temp_name` beside the target, renamed
    (a killed copy leaves it for :func:`sweep_temps`).
    """
    fd = -1
    if _linkat is not None and hasattr(os, "O_TMPFILE"):
        try:
            fd = os.open(target.parent, os.O_TMPFILE | os.O_WRONLY, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    if fd >= 0:
        try:
            _copy_into(src, fd)
            os.fchmod(fd, mode)
            _name_tmpfile(fd, target)
            return
        except OSError as e:
            if e.errno != errno.ENOENT or not target.parent.is_dir():
                raise
            # No /proc to name the inode by: copy again under a temporary name.
        finally:
            os.close(fd)
    tmp = temp_name(target)
    try:
        with open(tmp, "xb") as out:
            _copy_into(src, out.fileno())
            os.fchmod(out.fileno(), mode)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "exists", str(target))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _copy_into(src: Path, fd: int) -> None:
    # sendfile copies in the kernel between any two file systems (copy_file_range
    # refuses most pairs with EXDEV).
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        done = 0
        while done < size:
            n = os.sendfile(fd, f.fileno(), done, min(COPY_BLOCK_BYTES, size - done))
            if n == 0:
                raise OSError(errno.EIO, f"{src} ended {size - done} bytes early", str(src))
            done += n


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
