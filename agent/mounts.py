"""Mounts: read-only trees of hardlinks into the node cache's file store.

A mount is a directory of hardlinks to complete, verified files under
``<cache>/files/``, so every replica on the node shares one copy of the bytes, a mount
costs no disk and appears in microseconds, and duplicate files of a model are one inode.
Files are read-only (the store's inode has no write bits) and the directories the agent
created for a finished mount are sealed ``0555``.

A mount is shared: replicas of one deployment name the same ``mount_location``. So the
agent keeps, per mount, a :class:`MountLedger` of what *it* created there — each
directory and each file with the ``(st_dev, st_ino)`` it had — persisted in the node
cache's index beside the pull records (which say which live pull uses which path; the
engine counts those references). Only ledger entries whose inode is still in place are
ever changed: a directory that existed before (a user's folder) never changes mode and is
never removed, a file the agent did not place is never unlinked, and a file is recorded
*before* ``link(2)`` creates it (write-ahead), so a crash in between can leave at most a
name whose inode check later passes, never a name the agent forgets it made. Callers
serialise every operation on one mount (the engine holds a lock per mount), so linking,
sealing and removing never interleave.

Safety: :func:`check_mount_paths` runs over every path of a pull *before anything is
written anywhere*: the mount directory and every existing component under it are
``lstat``-ed and a symlink or a non-directory in the way is refused — a planted symlink
can never steer a link outside the mount — and a file at a path the pull needs that the
agent did not place, and that is not the node cache's very inode, is refused by name.
:func:`link_file` re-checks while creating (``bdn.fsutil.safe_target``), because the
tree could change between check and write. A file appears in a mount whole or not at
all: ``link(2)`` creates the name atomically for an already complete inode; the
cross-device fallback (a mount on another file system than the node cache) copies into
an unnamed ``O_TMPFILE`` inode and names it when complete (:func:`copy_across`); where a
file system lacks ``O_TMPFILE``, a temporary name a killed agent leaves behind is removed
at the next start (:func:`sweep_copy_leftovers`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import MountError
from bdn.errors import PathError
from bdn.fsutil import copy_file_atomic, refuse_unless_dir, safe_target, sweep_temps
from cache.node_errors import DiskFullError
from manifests.paths import check_relative_path

SEALED_DIR_MODE = 0o555
OPEN_DIR_MODE = 0o755
# Mounting at or under these would let a model's files shadow or litter the system.
SYSTEM_ROOTS = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/proc", "/sys", "/dev", "/boot")
ROOT_REL = "."  # the mount directory itself, in a ledger

Ident = tuple[int, int]  # (st_dev, st_ino)


@dataclass
class MountLedger:
    """What the agent created under one mount: relative path → ``(st_dev, st_ino)``."""

    mount: str
    dirs: dict[str, Ident] = field(default_factory=dict)
    files: dict[str, Ident] = field(default_factory=dict)
    # Directories about to be created (write-ahead, as for files): a kill between
    # ``mkdir`` and recording its inode leaves the name here, and the next operation on
    # the mount adopts the directory (:func:`_adopt_pending`) instead of treating it as
    # a user's folder that is never sealed.
    pending: set[str] = field(default_factory=set)

    @classmethod
    def from_doc(cls, mount: str, doc: Any) -> MountLedger:
        doc = doc or {}
        return cls(mount, {k: (int(v[0]), int(v[1])) for k, v in doc.get("dirs", {}).items()},
                   {k: (int(v[0]), int(v[1])) for k, v in doc.get("files", {}).items()},
                   {str(k) for k in doc.get("pending", [])})

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"dirs": {k: list(v) for k, v in self.dirs.items()},
                               "files": {k: list(v) for k, v in self.files.items()}}
        if self.pending:
            doc["pending"] = sorted(self.pending)
        return doc

    @property
    def empty(self) -> bool:
        return not self.dirs and not self.files and not self.pending


Save = Callable[[MountLedger], None]


def _ident(st: os.stat_result) -> Ident:
    return st.st_dev, st.st_ino


def _path(mount: Path, rel: str) -> Path:
    return mount if rel == ROOT_REL else mount / rel


def _depth(rel: str) -> int:
    return -1 if rel == ROOT_REL else rel.count("/")


def parent_dirs(rel: str) -> list[str]:
    """The ledger names of the directories holding ``rel``: ``.``, ``a``, ``a/b``..."""
    parts = rel.split("/")[:-1]
    return [ROOT_REL, *("/".join(parts[:i + 1]) for i in range(len(parts)))]


def check_mount_path(mount: str, *, field: str = "mount") -> Path:
    """An absolute, normalised mount path that is not itself a symlink nor at or under a
    system folder (see ``SYSTEM_ROOTS``); ``field`` names the request field in errors."""
    if not isinstance(mount, str) or not os.path.isabs(mount) or "\x00" in mount:
        raise PathError(f"{field} {mount!r} must be an absolute path", field=field)
    if ".." in mount.split("/"):
        raise PathError(f"{field} {mount!r} must not contain '..'", field=field)
    p = Path(os.path.normpath(mount))
    # The real path too: an ancestor may be a symlink into a system folder (/lib → usr/lib).
    for q in (p, Path(os.path.realpath(p))):
        if q == Path("/"):
            raise PathError(f"{field} cannot be / (asked: {mount})", field=field)
        for root in SYSTEM_ROOTS:
            if q == Path(root) or Path(root) in q.parents:
                raise PathError(f"{field} {mount} is at or under the system folder {root}; "
                                "refusing to mount there", field=field)
    with contextlib.suppress(FileNotFoundError):
        refuse_unless_dir(os.lstat(p), p, field, field=field)
    return p


def check_mount_paths(mount: str, rels: Iterable[str], *, ledger: MountLedger | None = None,
                      expected: Mapping[str, Path] | None = None) -> Path:
    """Refuse unsafe paths, planted symlinks, or foreign files under ``mount``; writes
    nothing. A file already at a path is accepted only if the ledger says the agent
    placed it, or it is the very inode ``expected[rel]`` (the node cache's file)."""
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
            if last and not _placed_or_same(st, cur, rel, ledger, expected):
                raise MountError(f"{cur} already exists and was not placed by bdn; refusing "
                                 "to replace it (move it away or mount elsewhere)",
                                 path=str(cur))
    return root


def _placed_or_same(st: os.stat_result, path: Path, rel: str, ledger: MountLedger | None,
                    expected: Mapping[str, Path] | None) -> bool:
    ours = ledger.files.get(rel) if ledger is not None else None
    if ours == _ident(st):
        return True
    src = (expected or {}).get(rel)
    if src is None:
        return False
    try:
        src_st = os.stat(src)
    except FileNotFoundError:
        return False
    if _ident(src_st) == _ident(st):
        return True
    # A cross-device copy named just before a kill kept its inode out of the ledger,
    # which still holds the write-ahead entry (the source's inode): the same bytes are
    # that copy, and :func:`link_file` adopts it. Refusing here failed the resumed pull
    # ("already exists and was not placed by bdn"; 3 in 30 runs of the kill -9 test).
    return (ours == _ident(src_st) and st.st_size == src_st.st_size
            and _same_bytes(path, src))


def link_file(mount: Path, rel: str, src: Path, ledger: MountLedger, save: Save) -> Path:
    """Expose ``src`` (a complete node-cache file) at ``mount/rel``; idempotent.

    Directories and the file it creates are recorded in ``ledger`` (and ``save``-d)
    before anything else can use them; the very inode already in place is success.
    """
    _adopt_pending(mount, ledger, save)
    _make_root(mount, ledger, save)
    _open_dirs(mount, rel, ledger)
    missing = {d for d in parent_dirs(rel)[1:] if not os.path.lexists(_path(mount, d))}
    if missing:
        ledger.pending |= missing
        save(ledger)
    created: list[Path] = []
    try:
        target = safe_target(mount, rel, created=created)
    finally:
        for d in created:
            os.chmod(d, OPEN_DIR_MODE)  # ours: independent of the umask
            ledger.dirs[d.relative_to(mount).as_posix()] = _ident(os.lstat(d))
        if created or missing:
            ledger.pending -= missing
            save(ledger)
    src_st = os.stat(src)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(target)
        if _ident(st) == _ident(src_st):
            return target
        ours = ledger.files.get(rel)
        if (ours in (_ident(st), _ident(src_st)) and st.st_size == src_st.st_size
                and _same_bytes(target, src)):
            # A cross-device copy made earlier — possibly named just before a crash that
            # kept its inode out of the ledger, which still holds the write-ahead entry.
            if ours != _ident(st):
                ledger.files[rel] = _ident(st)
                save(ledger)
            return target
        raise MountError(f"{target} already exists with other content; refusing to replace "
                         "it", path=str(target))
    ledger.files[rel] = _ident(src_st)
    save(ledger)
    try:
        try:
            os.link(src, target)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            copy_across(src, target, src_st)
            ledger.files[rel] = _ident(os.lstat(target))
            save(ledger)
    except FileExistsError:
        _forget(ledger, rel, save)
        raise MountError(f"{target} appeared while linking; refusing to replace it",
                         path=str(target)) from None
    except BaseException:
        _forget(ledger, rel, save)
        raise
    return target


def _forget(ledger: MountLedger, rel: str, save: Save) -> None:
    ledger.files.pop(rel, None)
    save(ledger)


def _adopt_pending(mount: Path, ledger: MountLedger, save: Save) -> None:
    """Directories written ahead and then made by a killed agent (see
    :attr:`MountLedger.pending`) are the agent's: recorded with their inode. Ones that
    never got made are dropped."""
    if not ledger.pending:
        return
    for rel_dir in ledger.pending:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            st = os.lstat(_path(mount, rel_dir))
            if stat.S_ISDIR(st.st_mode) and rel_dir not in ledger.dirs:
                ledger.dirs[rel_dir] = _ident(st)
    ledger.pending.clear()
    save(ledger)


def _make_root(mount: Path, ledger: MountLedger, save: Save) -> None:
    try:
        st = os.lstat(mount)
    except FileNotFoundError:
        mount.parent.mkdir(parents=True, exist_ok=True)
        ledger.pending.add(ROOT_REL)
        save(ledger)
        try:
            os.mkdir(mount, OPEN_DIR_MODE)
        except FileExistsError:
            pass
        else:
            os.chmod(mount, OPEN_DIR_MODE)
            ledger.dirs[ROOT_REL] = _ident(os.lstat(mount))
        ledger.pending.discard(ROOT_REL)
        save(ledger)
        st = os.lstat(mount)
    refuse_unless_dir(st, mount, "mount", field="mount")


def copy_across(src: Path, target: Path, src_st: os.stat_result) -> None:
    """The cross-device fallback of :func:`link_file`: a copy that gets its name only
    when complete (``bdn.fsutil.copy_file_atomic``), so nothing partial is ever visible
    in the mount, even after ``kill -9``. A full file system under the mount is the
    node's clear "disk full" (bytes needed, path), not a bare ``OSError``."""
    try:
        copy_file_atomic(src, target, stat.S_IMODE(src_st.st_mode))
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


def _open_dir(mount: Path, rel_dir: str, ledger: MountLedger) -> None:
    """Re-open a sealed directory the agent created; any other is left as it is."""
    path = _path(mount, rel_dir)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        st = os.lstat(path)
        if (ledger.dirs.get(rel_dir) == _ident(st) and stat.S_ISDIR(st.st_mode)
                and stat.S_IMODE(st.st_mode) != OPEN_DIR_MODE):
            os.chmod(path, OPEN_DIR_MODE)


def _open_dirs(mount: Path, rel: str, ledger: MountLedger) -> None:
    for d in parent_dirs(rel):
        _open_dir(mount, d, ledger)


def seal(mount: Path, ledger: MountLedger) -> None:
    """Make every directory the agent created for this mount read-only."""
    for rel_dir in sorted(ledger.dirs, key=_depth, reverse=True):
        path = _path(mount, rel_dir)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            st = os.lstat(path)
            if (ledger.dirs[rel_dir] == _ident(st) and stat.S_ISDIR(st.st_mode)
                    and stat.S_IMODE(st.st_mode) != SEALED_DIR_MODE):
                os.chmod(path, SEALED_DIR_MODE)


def _real_dirs_to(mount: Path, rel: str) -> bool:
    """Whether every directory between ``mount`` and ``rel`` is a real directory (no
    symlink swapped in since), so removing ``mount/rel`` stays inside the mount."""
    cur = mount
    for seg in ["", *rel.split("/")[:-1]]:
        cur = cur / seg if seg else cur
        try:
            st = os.lstat(cur)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
    return True


def release(mount: Path, ledger: MountLedger, drop: Iterable[str],
            keep_dirs: set[str]) -> int:
    """Remove the files in ``drop`` that the agent placed (and are still its inode), then
    the directories it created that are empty and not in ``keep_dirs`` (still needed by
    a live pull). Updates ``ledger``; returns the files removed."""
    removed = 0
    for rel in drop:
        ident = ledger.files.get(rel)
        if ident is None:
            continue
        try:
            check_relative_path(rel)
        except PathError:
            ledger.files.pop(rel)
            continue
        target = mount / rel
        if not _real_dirs_to(mount, rel):
            ledger.files.pop(rel)
            continue
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            ledger.files.pop(rel)
            continue
        if _ident(st) != ident or not stat.S_ISREG(st.st_mode):
            ledger.files.pop(rel)  # replaced by someone else: theirs now, left alone
            continue
        _open_dir(mount, parent_dirs(rel)[-1], ledger)
        os.unlink(target)
        ledger.files.pop(rel)
        removed += 1
    for rel_dir in sorted(ledger.dirs, key=_depth, reverse=True):
        if rel_dir in keep_dirs:
            continue
        path = _path(mount, rel_dir)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            ledger.dirs.pop(rel_dir)
            continue
        if ledger.dirs[rel_dir] != _ident(st) or not stat.S_ISDIR(st.st_mode):
            ledger.dirs.pop(rel_dir)
            continue
        if rel_dir != ROOT_REL:
            parent = rel_dir.rpartition("/")[0] or ROOT_REL
            _open_dir(mount, parent, ledger)
        try:
            os.rmdir(path)
        except OSError:
            continue  # not empty: something the agent did not place, or still in use
        ledger.dirs.pop(rel_dir)
    return removed
