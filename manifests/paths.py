"""Relative paths inside a model: the only kind a manifest may name.

A path in a manifest becomes a file under some root on a node, so it must not be able
to leave that root. Accepted paths are POSIX, relative, already normalised (no empty,
``.`` or ``..`` segments, no trailing slash), free of NUL and backslash, and each segment
fits a file name. Checking the string is necessary but not sufficient — writers must
still refuse symlinks on disk (agent/) — yet it is the check every reader can share.
"""

from __future__ import annotations

from manifests.errors import PathError

MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255


def check_relative_path(path: object, *, record: str = "", field: str = "path") -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise :class:`PathError`."""
    def fail(why: str) -> PathError:
        return PathError(f"{path!r} {why}", record=record, field=field)

    if not isinstance(path, str) or not path:
        raise fail("is not a non-empty string")
    if "\x00" in path or "\\" in path:
        raise fail("contains NUL or a backslash")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise fail(f"is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise fail("is absolute; paths must be relative to the model root")
    for seg in path.split("/"):
        if seg in ("", ".", ".."):
            raise fail("is not normalised or escapes the root (empty, '.' or '..' segment)")
        if len(seg.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise fail(f"has a segment longer than {MAX_SEGMENT_BYTES} bytes")
    return path


def check_no_file_dir_conflicts(paths: list[str], *, record: str = "files") -> None:
    """Refuse a set where one path is a directory prefix of another (``a`` and ``a/b``)."""
    names = set(paths)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in names:
                raise PathError(f"{prefix!r} is both a file and the directory of {p!r}",
                                record=record, field="path")
