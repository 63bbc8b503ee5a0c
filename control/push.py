"""Pushes: a model folder sent by ``bdn push`` becomes a code manifest and pinned weights.

The client sends the folder itself, not a path on the server: it lists every file with
its BLAKE3 digest, the server answers which contents it lacks, the client uploads only
those, then creates the deployment with the list. Uploads are kept by digest under
``STATE/uploads`` (written to a temporary file while hashed, renamed once verified), so
an unchanged push uploads nothing and a changed one only the files that changed; one no
push named for :data:`UPLOAD_KEEP_S` (a week) is removed at the next push.

Creating the deployment then, in a worker thread:

1. assembles the folder from the uploads (hard links, copies for files sent as
   executable so the bit reaches the manifest; every path checked to be relative and
   contained before anything is written) and mirrors it into the blob
   store like any model: the *code manifest*. Its files keep their uploads' inodes, so
   an unchanged folder is found by source fingerprint without re-reading it.
2. mirrors every ``weights:`` entry of its ``config.yaml`` into the same store under
   the entry's documented ref (``bdn.mirror_key``), so the node agent and ``bdn pull``
   find it too. The mirror skips by source fingerprint what the store already has, from
   metadata alone: pushing again downloads no weight byte that was mirrored before.
3. records the resolved manifest digests on the deployment (:class:`PushRecord`). A
   published deployment is pinned to them: a later upstream commit never changes what
   its scale-ups load. The development deployment re-resolves on every push.

Progress events (the mirror's, tagged with what is being mirrored) go to a callback, so
the API can stream them to ``bdn push``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import blake3

from bdn.config import load_model_config
from bdn.errors import BdnError
from bdn.fsutil import safe_target
from bdn.mirror import Mirror, MirrorOptions
from bdn.mirror_key import mirror_ref
from bdn.secrets import SecretResolver
from bdn.sources import open_source
from bdn.store import BlobStore
from control.errors import RequestError
from control.resources import instance_type_for

UPLOADS_DIR = "uploads"
ASSEMBLY_DIR = "pushes"
SPOOL_DIR = "spool"
MAX_PUSH_FILES = 10_000
UPLOAD_BLOCK_BYTES = 1 << 20
# One file of a model folder; weights belong in weights: (mirrored, not uploaded).
MAX_UPLOAD_BYTES = 1 << 30
# A partial upload or assembled folder untouched this long belongs to a dead push.
STALE_S = 3600.0
# An upload no push named (asked about or assembled) for this long is removed; a later
# push that needs it uploads it again. Without it, every version of every file ever
# pushed stayed under STATE/uploads for good.
UPLOAD_KEEP_S = 7 * 24 * 3600.0
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
# Folders a push never sends: caches and version control, not the model.
SKIPPED_DIRS = ("__pycache__", ".git", ".venv", "node_modules")

Progress = Callable[[dict[str, Any]], None]
# The mirror's events a push forwards (as ``mirror_<event>``).
FORWARDED_EVENTS = ("listed", "file", "bytes")


@dataclass(frozen=True)
class PushedFile:
    path: str
    digest: str  # BLAKE3 hex of the whole file
    executable: bool = False


@dataclass(frozen=True)
class PushRecord:
    """What a pushed deployment runs: stored with it, turned into replica specs."""

    code: str
    weights: tuple[Mapping[str, Any], ...] = ()
    environment_variables: Mapping[str, str] = field(default_factory=dict)
    secret_names: tuple[str, ...] = ()
    # config.yaml's resources: (validated at push; control/resources.py).
    resources: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "weights": [dict(w) for w in self.weights],
                "environment_variables": dict(self.environment_variables),
                "secrets": list(self.secret_names), "resources": dict(self.resources)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> PushRecord:
        return cls(code=doc["code"], weights=tuple(doc.get("weights") or ()),
                   environment_variables=dict(doc.get("environment_variables") or {}),
                   secret_names=tuple(doc.get("secrets") or ()),
                   resources=dict(doc.get("resources") or {}))


def file_digest(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(UPLOAD_BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def list_folder(root: Path) -> list[PushedFile]:
    """The files ``bdn push`` sends from ``root`` (symlinks are refused, not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                raise RequestError(f"{p} is a symbolic link; push sends regular files only",
                                   field="model_dir")
            rel = p.relative_to(root).as_posix()
            out.append(PushedFile(rel, file_digest(p), os.access(p, os.X_OK)))
    return out


def check_rel_path(path: object, index: int) -> str:
    """A relative, normalised path without '..'; the error names the files[] entry."""
    fld = f"files[{index}].path"
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        raise RequestError(f"must be a relative path, got {path!r}", field=fld)
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or p.as_posix() != path or path.startswith("./"):
        raise RequestError(f"must be a normalised relative path without '..', got {path!r}",
                           field=fld)
    return path


def parse_files(doc: Any) -> list[PushedFile]:
    if not isinstance(doc, list) or not doc:
        raise RequestError("must be a non-empty list of {path, digest}", field="files")
    if len(doc) > MAX_PUSH_FILES:
        raise RequestError(f"at most {MAX_PUSH_FILES} files, got {len(doc)}", field="files")
    out: list[PushedFile] = []
    seen: set[str] = set()
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise RequestError("must be an object", field=f"files[{i}]")
        path = check_rel_path(item.get("path"), i)
        if path in seen:
            raise RequestError(f"{path!r} is listed twice", field=f"files[{i}].path")
        seen.add(path)
        digest = item.get("digest")
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
            raise RequestError("must be 64 lowercase hex digits (BLAKE3)",
                               field=f"files[{i}].digest")
        out.append(PushedFile(path, digest, bool(item.get("executable", False))))
    # A path may not be both a file and a folder.
    for f in out:
        for parent in PurePosixPath(f.path).parents:
            if str(parent) in seen:
                raise RequestError(f"{parent} is both a file and a folder", field="files")
    if "config.yaml" not in seen:
        raise RequestError("the model folder has no config.yaml", field="files")
    return out


class Pushes:
    """Uploads and push assembly under the control server's state folder."""

    def __init__(self, state_dir: Path, store: BlobStore, *,
                 secrets_resolver: SecretResolver | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.uploads = state_dir / UPLOADS_DIR
        self.assembly = state_dir / ASSEMBLY_DIR
        self.spool = state_dir / SPOOL_DIR
        for d in (self.uploads, self.assembly, self.spool):
            d.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        # Digest → when a push last named it, in this process (a push asks which
        # contents are missing, uploads the rest, then assembles: what it was told is
        # there must still be there when it assembles).
        self._named: dict[str, float] = {}
        self._named_lock = threading.Lock()
        self.sweep()
        self.store = store
        self.secrets = secrets_resolver or SecretResolver.from_env()
        self.mirror = Mirror(store, MirrorOptions(spool_dir=str(self.spool)))
        self._lock = threading.Lock()

    def _name(self, digests: Sequence[str]) -> None:
        now = self._clock()
        with self._named_lock:
            for d in digests:
                self._named[d] = now

    def sweep(self) -> None:
        """Remove what an interrupted push left behind (partial uploads, assembled
        folders) and uploads no push named for :data:`UPLOAD_KEEP_S`. Only names this
        module writes are touched; nothing else in these folders is."""
        now = self._clock()
        with self._named_lock:
            self._named = {d: t for d, t in self._named.items() if now - t < STALE_S}
            named = set(self._named)
        for p in self.uploads.iterdir():
            if not DIGEST_RE.fullmatch(p.name) or p.name in named:
                continue
            with contextlib.suppress(OSError):
                st = p.lstat()
                # ctime: when it was uploaded or last linked into a push's folder
                # (os.link changes the link count, hence the ctime).
                if stat.S_ISREG(st.st_mode) and now - st.st_ctime > UPLOAD_KEEP_S:
                    p.unlink()
        for p in self.uploads.glob(".*.part"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_S:
                    p.unlink()
        for p in self.assembly.glob("push-*"):
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink() and now - p.stat().st_mtime > STALE_S:
                    shutil.rmtree(p)

    def missing(self, digests: Sequence[str]) -> list[str]:
        for i, d in enumerate(digests):
            if not isinstance(d, str) or not DIGEST_RE.fullmatch(d):
                raise RequestError("must be 64 lowercase hex digits (BLAKE3)",
                                   field=f"digests[{i}]")
        self._name(digests)
        return sorted({d for d in digests if not (self.uploads / d).is_file()})

    def upload_target(self, digest: str) -> tuple[Path, Path]:
        """(temporary path to write, final path) for an upload of ``digest``."""
        if not DIGEST_RE.fullmatch(digest):
            raise RequestError("must be 64 lowercase hex digits (BLAKE3)", field="digest")
        tmp = self.uploads / f".{digest}.{secrets.token_hex(4)}.part"
        return tmp, self.uploads / digest

    @staticmethod
    def finish_upload(tmp: Path, final: Path, got: str, digest: str) -> None:
        if got != digest:
            tmp.unlink(missing_ok=True)
            raise RequestError(f"the body's BLAKE3 is {got}, not {digest}", field="digest")
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)

    def assemble(self, files: Sequence[PushedFile]) -> Path:
        """A fresh folder holding the pushed files (hard links to the uploads); the
        caller (:meth:`push`) named them first, so a sweep leaves them be."""
        lacking = [f.path for f in files if not (self.uploads / f.digest).is_file()]
        if lacking:
            raise RequestError(f"not uploaded yet: {', '.join(lacking[:5])}", field="files")
        folder = self.assembly / f"push-{secrets.token_hex(6)}"
        folder.mkdir()
        try:
            for f in files:
                target = safe_target(folder, f.path)
                if f.executable:
                    # A copy: the upload's inode is shared by every push naming it,
                    # and its mode is what the code manifest records.
                    shutil.copyfile(self.uploads / f.digest, target)
                    os.chmod(target, 0o555)
                    # Same mode, new ctime: marks the upload used, as a link would.
                    os.chmod(self.uploads / f.digest, 0o444)
                else:
                    os.link(self.uploads / f.digest, target)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def push(self, files: Sequence[PushedFile], progress: Progress | None = None
             ) -> PushRecord:
        """Mirror the code and every weights entry; the record to store (blocking)."""
        emit = progress or (lambda _e: None)
        self._name([f.digest for f in files])  # before the sweep: this push needs them
        self.sweep()
        folder = self.assemble(files)
        try:
            config = load_model_config(folder / "config.yaml")
            # A bad resources: is refused before anything is mirrored (400 naming it).
            instance_type_for(config.resources or None)
            emit({"event": "code", "files": len(files)})
            # Fingerprints of the code folder's files are their upload inodes; a push
            # assembles a new folder, so the path differs: hash it (it is small).
            with self._lock:
                code = self.mirror.run(open_source(str(folder))).manifest_digest
            emit({"event": "code_manifest", "digest": str(code)})
            weights = []
            for i, entry in enumerate(config.weights):
                emit({"event": "weights", "index": i, "source": entry.source.uri})

                def tagged(event: dict[str, Any], i: int = i) -> None:
                    # Per-object events are noise to a pusher; bytes carry the progress.
                    if event.get("event") in FORWARDED_EVENTS:
                        emit({**event, "index": i, "event": f"mirror_{event.get('event')}"})

                source = open_source(entry.source, secrets=self.secrets, auth=entry.auth)
                try:
                    result = self.mirror.run(source, ref=mirror_ref(entry),
                                             allow=entry.allow_patterns,
                                             ignore=entry.ignore_patterns, progress=tagged)
                finally:
                    source.close()
                stats = result.stats
                emit({"event": "weights_manifest", "index": i,
                      "digest": str(result.manifest_digest), "source": result.source,
                      "bytes": stats.logical_bytes, "bytes_from_origin": stats.bytes_from_origin,
                      "files_reused": stats.files_reused, "files": stats.files})
                weights.append({**entry.to_dict(), "ref": str(result.manifest_digest)})
            return PushRecord(code=str(code), weights=tuple(weights),
                              environment_variables=dict(config.environment_variables),
                              secret_names=tuple(str(k) for k in config.secrets),
                              resources=dict(config.resources or {}))
        except BdnError:
            raise
        except (OSError, ValueError) as e:
            raise RequestError(f"the pushed model could not be read: {e}",
                               field="files") from None
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)

    def secret_env(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """``BDN_SECRET_<NAME>`` for each declared secret the server has a value for."""
        from bdn.secrets import env_name

        out = []
        for name in names:
            try:
                value = self.secrets.get(name).reveal()
            except BdnError:
                continue  # not configured here: the model sees no value, as in Truss
            out.append((env_name(name), value))
        return out
