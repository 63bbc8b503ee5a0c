"""Manifest records, their canonical encoding, and validating parse.

A manifest names a source (and its pinned revision) and every file of a model: relative
path, size, mode, file digest (BLAKE3 of the chunk list), and the chunks that tile it
(digest, offset, length, encoding, stored length). It is encoded canonically — sorted
keys, no insignificant whitespace, UTF-8 — so equal content gives equal bytes, and its
own digest (BLAKE3 of those bytes) is its identity; it is stored as an object like any
chunk.

:func:`parse_manifest` validates everything before a caller can act on it: a known
version; safe, unique, non-conflicting paths; chunks contiguous from offset 0 that add
up to the file size, none longer than ``MAX_CHUNK_BYTES``; a file digest that matches
the chunk list; known encodings; consistent stored lengths. Errors name the record
(``files[3].chunks[2]``) and field. Nothing here touches a disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from manifests.digest import Digest
from manifests.errors import DigestError, ManifestError
from manifests.paths import check_no_file_dir_conflicts, check_relative_path

MANIFEST_VERSION = 1
KNOWN_VERSIONS = (1,)
ENCODING_RAW = "raw"
ENCODING_ZSTD = "zstd"
ENCODINGS = (ENCODING_RAW, ENCODING_ZSTD)
DEFAULT_FILE_MODE = 0o644
# A file's digest is the BLAKE3 of its chunk list (domain-separated, so no file's
# content can pose as another file's list). It is computable from the manifest alone,
# so any reader can check it without a second pass over the bytes, and with every chunk
# verified against its own digest it pins the file's bytes exactly.
FILE_DIGEST_DOMAIN = b"bdn-file-v1\n"
# A manifest past this size is refused before parsing (about 500k chunks).
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# No chunk may be longer than this (bdn's own planner never makes one above 16 MiB).
# Readers hold a whole chunk in memory to verify it before writing, so a manifest that
# could name a chunk of any length could size their memory; it is refused at parse time.
MAX_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Chunk:
    """A contiguous piece of a file, stored as one object."""

    digest: Digest
    offset: int
    length: int
    encoding: str = ENCODING_RAW
    stored_length: int = -1  # -1: same as length (raw)

    def __post_init__(self) -> None:
        if self.stored_length == -1:
            object.__setattr__(self, "stored_length", self.length)

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_dict(self) -> dict[str, Any]:
        return {"digest": str(self.digest), "offset": self.offset, "length": self.length,
                "encoding": self.encoding, "stored_length": self.stored_length}


def file_digest(chunks: Iterable[Chunk]) -> Digest:
    """The digest of a file made of ``chunks`` (see ``FILE_DIGEST_DOMAIN``)."""
    lines = "\n".join(f"{c.digest.hex} {c.offset} {c.length}" for c in chunks)
    return Digest.of(FILE_DIGEST_DOMAIN + lines.encode())


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a model."""

    path: str
    size: int
    digest: Digest
    chunks: tuple[Chunk, ...]
    mode: int = DEFAULT_FILE_MODE

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mode": self.mode,
                "digest": str(self.digest), "chunks": [c.to_dict() for c in self.chunks]}

    @property
    def executable(self) -> bool:
        return bool(self.mode & 0o111)

    @classmethod
    def from_chunks(cls, path: str, chunks: Iterable[Chunk],
                    mode: int = DEFAULT_FILE_MODE) -> FileEntry:
        chunks = tuple(chunks)
        return cls(path=path, size=sum(c.length for c in chunks),
                   digest=file_digest(chunks), chunks=chunks, mode=mode)


@dataclass(frozen=True)
class Manifest:
    """A model's files. ``files`` are sorted by path; ``source`` holds no secrets."""

    files: tuple[FileEntry, ...]
    source: dict[str, str] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "source": dict(self.source),
                "files": [f.to_dict() for f in self.files]}

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def digest(self) -> Digest:
        return Digest.of(self.canonical_bytes())

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def iter_chunks(self) -> Iterator[tuple[FileEntry, Chunk]]:
        for f in self.files:
            for c in f.chunks:
                yield f, c

    def unique_chunks(self) -> dict[Digest, Chunk]:
        """One chunk per distinct digest (the objects this manifest needs)."""
        out: dict[Digest, Chunk] = {}
        for _, c in self.iter_chunks():
            out.setdefault(c.digest, c)
        return out

    @property
    def unique_size(self) -> int:
        return sum(c.length for c in self.unique_chunks().values())


EMPTY_FILE_DIGEST = file_digest(())


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def build_manifest(files: Iterable[FileEntry], source: dict[str, str]) -> Manifest:
    """Assemble and validate a manifest from entries (sorted by path)."""
    m = Manifest(files=tuple(sorted(files, key=lambda f: f.path)),
                 source={str(k): str(v) for k, v in source.items()})
    return manifest_from_dict(m.to_dict())  # one validation path for built and parsed


def parse_manifest(data: bytes | bytearray | memoryview, *,
                   expect: Digest | None = None) -> Manifest:
    """Parse canonical bytes; with ``expect``, also check they hash to that digest."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
    if expect is not None:
        expect.verify(data, where="manifest")
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest is not UTF-8 JSON: {e}") from None
    return manifest_from_dict(doc)


def _int(value: Any, record: str, fld: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise ManifestError(f"must be an integer ≥ {minimum}, got {value!r}",
                            record=record, field=fld)
    return value


def _digest(value: Any, record: str, fld: str) -> Digest:
    try:
        return Digest.parse(value)
    except DigestError as e:
        raise ManifestError(str(e), record=record, field=fld) from None


def _keys(doc: dict[str, Any], allowed: set[str], record: str) -> None:
    unknown = set(doc) - allowed
    if unknown:
        raise ManifestError(f"unknown field(s) {sorted(unknown)}", record=record,
                            field=sorted(unknown)[0])
    missing = allowed - set(doc)
    if missing:
        raise ManifestError("is required", record=record, field=sorted(missing)[0])


def manifest_from_dict(doc: Any) -> Manifest:
    if not isinstance(doc, dict):
        raise ManifestError("manifest must be a JSON object")
    _keys(doc, {"version", "source", "files"}, "manifest")
    version = doc["version"]
    if version not in KNOWN_VERSIONS or type(version) is not int:
        raise ManifestError(f"unknown version {version!r}; this bdn reads {KNOWN_VERSIONS}",
                            record="manifest", field="version")
    source = doc["source"]
    if not isinstance(source, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in source.items()):
        raise ManifestError("must map strings to strings", record="manifest", field="source")
    raw_files = doc["files"]
    if not isinstance(raw_files, list):
        raise ManifestError("must be a list", record="manifest", field="files")
    files: list[FileEntry] = []
    seen: dict[str, int] = {}
    for i, fd in enumerate(raw_files):
        rec = f"files[{i}]"
        if not isinstance(fd, dict):
            raise ManifestError("must be an object", record=rec)
        _keys(fd, {"path", "size", "mode", "digest", "chunks"}, rec)
        path = check_relative_path(fd["path"], record=rec)
        if path in seen:
            raise ManifestError(f"duplicate path {path!r} (also files[{seen[path]}])",
                                record=rec, field="path")
        seen[path] = i
        size = _int(fd["size"], rec, "size")
        mode = _int(fd["mode"], rec, "mode")
        if mode > 0o777:
            raise ManifestError(f"mode {oct(mode)} has bits beyond 0o777", record=rec,
                                field="mode")
        digest = _digest(fd["digest"], rec, "digest")
        if not isinstance(fd["chunks"], list):
            raise ManifestError("must be a list", record=rec, field="chunks")
        chunks = tuple(_chunks(fd["chunks"], size, rec, path))
        if digest != file_digest(chunks):
            raise ManifestError(f"file digest {digest} does not match its chunk list",
                                record=rec, field="digest")
        files.append(FileEntry(path=path, size=size, mode=mode, digest=digest, chunks=chunks))
    paths = [f.path for f in files]
    if paths != sorted(paths):
        raise ManifestError("files must be sorted by path", record="manifest", field="files")
    check_no_file_dir_conflicts(paths)
    return Manifest(files=tuple(files), source=dict(source), version=version)


def _chunks(items: list[Any], size: int, rec: str, path: str) -> Iterator[Chunk]:
    pos = 0
    for j, cd in enumerate(items):
        crec = f"{rec}.chunks[{j}]"
        if not isinstance(cd, dict):
            raise ManifestError("must be an object", record=crec)
        _keys(cd, {"digest", "offset", "length", "encoding", "stored_length"}, crec)
        offset = _int(cd["offset"], crec, "offset")
        length = _int(cd["length"], crec, "length", minimum=1)
        if length > MAX_CHUNK_BYTES:
            raise ManifestError(f"chunk of {path!r} at offset {offset} is {length} bytes, "
                                f"above the maximum of {MAX_CHUNK_BYTES // (1024 * 1024)} MiB "
                                f"({MAX_CHUNK_BYTES} bytes)", record=crec, field="length")
        if offset != pos:
            kind = "gap" if offset > pos else "overlap"
            raise ManifestError(f"{kind}: chunk starts at {offset} but the previous one ends "
                                f"at {pos}", record=crec, field="offset")
        encoding = cd["encoding"]
        if encoding not in ENCODINGS:
            raise ManifestError(f"unknown encoding {encoding!r}; known: {ENCODINGS}",
                                record=crec, field="encoding")
        stored = _int(cd["stored_length"], crec, "stored_length", minimum=1)
        if stored > MAX_CHUNK_BYTES:
            raise ManifestError(f"chunk of {path!r} at offset {offset} is stored in {stored} "
                                f"bytes, above the maximum of {MAX_CHUNK_BYTES} bytes",
                                record=crec, field="stored_length")
        if encoding == ENCODING_RAW and stored != length:
            raise ManifestError(f"raw chunk stored_length {stored} differs from length "
                                f"{length}", record=crec, field="stored_length")
        pos = offset + length
        yield Chunk(digest=_digest(cd["digest"], crec, "digest"), offset=offset,
                    length=length, encoding=encoding, stored_length=stored)
    if pos != size:
        raise ManifestError(f"chunks cover {pos} bytes but size is {size}", record=rec,
                            field="chunks")
