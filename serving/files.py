"""Which safetensors files to load, and their headers read without trusting them.

Input is a folder, an ``*.index.json`` (Hugging Face sharding) or explicit files. All of
it may still be arriving: every read first asks the readiness source for the bytes.

Header safety is layered on :mod:`manifests.safetensors`, the one parser: the 8-byte
prefix is read first and the length it declares is checked against the file size and a
bound *before* the header is read (so a length of 2^60 costs 8 bytes of memory, not an
allocation), then the JSON is validated entirely (dtypes, shapes × dtype size = byte
length, offsets inside the file, no overlaps) before the loader sizes anything by it.
The largest allocation a hostile file can cause is therefore bounded by its header
limit or by its real size, whichever is smaller.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

from manifests.errors import SafetensorsError
from manifests.safetensors import MAX_HEADER_BYTES, PREFIX_BYTES, SafetensorsHeader
from manifests.safetensors import header_length as _header_length
from manifests.safetensors import parse_header as _parse_header
from serving.errors import WeightsFileError
from serving.readiness import FilesReady, ReadinessSource, normalize

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
PREFERRED_INDEX = "model.safetensors.index.json"
# An index lists tensor names and file names; 64 MiB is far beyond any real one.
MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True)
class WeightFiles:
    """The resolved set: logical absolute paths in load order, and the index if any."""

    paths: tuple[str, ...]
    # tensor name → logical path of the shard that must hold it (from the index)
    weight_map: dict[str, str] | None = None
    index_path: str | None = None


def resolve(source: str | os.PathLike[str] | list[str] | tuple[str, ...],
            readiness: ReadinessSource | None = None, *,
            timeout_s: float | None = None) -> WeightFiles:
    """Resolve a folder, an index or explicit files into :class:`WeightFiles`."""
    ready = readiness or FilesReady()
    if isinstance(source, list | tuple):
        paths = tuple(normalize(p) for p in source)
        if not paths:
            raise WeightFilesEmpty("no weight files given")
        dupes = {p for p in paths if paths.count(p) > 1}
        if dupes:
            raise WeightFileError("given more than once", path=sorted(dupes)[0])
        return WeightFiles(paths)
    path = normalize(source)
    if path.endswith(".json"):
        return _from_index(path, ready, timeout_s)
    if path.endswith(SAFETENSORS_SUFFIX) and not os.path.isdir(path):
        # A file by name: it may not exist yet when its bytes are still arriving.
        return WeightFiles((path,))
    listed = ready.listing(path, timeout_s=timeout_s)
    is_dir = listed is not None or os.path.isdir(path)
    if not is_dir:
        if not os.path.exists(path):
            raise WeightFileError("no such file or folder", path=path)
        return WeightFiles((path,))
    names = listed if listed is not None else _list_dir(path)
    direct = [n for n in names if os.path.dirname(n) == path]
    indexes = sorted(n for n in direct if n.endswith(INDEX_SUFFIX))
    if indexes:
        preferred = [n for n in indexes if os.path.basename(n) == PREFERRED_INDEX]
        return _from_index((preferred or indexes)[0], ready, timeout_s)
    files = sorted(n for n in direct if n.endswith(SAFETENSORS_SUFFIX))
    if not files:
        raise WeightFilesEmpty("no *.safetensors files in this folder", path=path)
    return WeightFiles(tuple(files))


class WeightFileError(WeightsFileError):
    """One named weights file is missing or unusable."""


class WeightFilesEmpty(WeightsFileError):
    """There is nothing to load."""


def _list_dir(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [os.path.join(path, e.name) for e in it if e.is_file()]
    except OSError as e:
        raise WeightFileError(f"cannot list folder: {e.strerror}", path=path) from None


def _from_index(index: str, ready: ReadinessSource, timeout_s: float | None) -> WeightFiles:
    disk = ready.wait_complete(index, timeout_s=timeout_s)
    try:
        with open(disk, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise WeightFileError(f"cannot read index: {e.strerror}", path=index) from None
    if len(raw) > MAX_INDEX_BYTES:
        raise WeightFileError(f"index is larger than {MAX_INDEX_BYTES} bytes", path=index)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise WeightFileError(f"index is not valid JSON: {e}", path=index) from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise WeightFileError("index has no weight_map object", path=index)
    folder = os.path.dirname(index)
    weight_map: dict[str, str] = {}
    order: dict[str, None] = {}
    for name, rel in wm.items():
        if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\x00" in rel:
            raise WeightFileError(f"weight_map[{name!r}] is not a relative file name: {rel!r}",
                                  path=index)
        shard = os.path.normpath(os.path.join(folder, rel))
        if not shard.startswith(folder.rstrip(os.sep) + os.sep):
            raise WeightFileError(f"weight_map[{name!r}] = {rel!r} escapes the index's folder",
                                  path=index)
        weight_map[name] = shard
        order[shard] = None
    # Shards in name order (model-00001-of-00004, ...), which is also the order a
    # puller delivers them, so streaming loads the first shard first.
    return WeightFiles(tuple(sorted(order)), weight_map=weight_map, index_path=index)


@dataclass(frozen=True)
class OpenedFile:
    """A weights file opened for reading: logical path, fd, size and validated header."""

    path: str
    fd: int
    size: int
    header: SafetensorsHeader


def read_exact(fd: int, n: int, offset: int, *, path: str, what: str) -> bytes:
    """``n`` bytes at ``offset`` or a :class:`SafetensorsError` naming where it fell short."""
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [mv[got:]], offset + got)
        if k == 0:
            raise SafetensorsError(f"file ends inside the {what} (needed {n} bytes, got {got})",
                                   path=path, offset=offset + got)
        got += k
    return bytes(buf)


def open_file(path: str, ready: ReadinessSource, *, timeout_s: float | None = None,
              max_header_bytes: int = MAX_HEADER_BYTES) -> OpenedFile:
    """Open ``path`` and validate its header, waiting for the header bytes if needed.

    The caller owns the returned fd.
    """
    disk = ready.wait_range(path, 0, PREFIX_BYTES, timeout_s=timeout_s)
    try:
        fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise WeightFileError(f"cannot open: {e.strerror}", path=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WeightFileError("is not a regular file", path=path)
        known = ready.file_size(path)
        size = known if known is not None else st.st_size
        prefix = read_exact(fd, min(PREFIX_BYTES, size), 0, path=path, what="header length") \
            if size >= PREFIX_BYTES else b""
        n = _header_length(prefix, size, path=path, max_header_bytes=max_header_bytes)
        ready.wait_range(path, 0, PREFIX_BYTES + n, timeout_s=timeout_s)
        head = prefix + read_exact(fd, n, PREFIX_BYTES, path=path, what="header")
        header = _parse_header(head, size, path=path, max_header_bytes=max_header_bytes)
        return OpenedFile(path=path, fd=fd, size=size, header=header)
    except BaseException:
        os.close(fd)
        raise
