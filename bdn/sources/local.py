"""A local directory (``file:///abs/path`` or a bare path) as a source.

Files are chunked in place — no copy. Symlinks to regular files are followed (a Hugging
Face cache snapshot is a tree of symlinks into ``blobs/``); symlinked directories are not
descended, so a link cycle cannot loop the walk. The fingerprint is device + inode +
size + mtime, which changes whenever the content can have changed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bdn.config import SourceURI
from bdn.errors import SourceError
from bdn.fsutil import contained_root
from bdn.sources.base import Source, SourceFile


def local_source_path(uri: SourceURI) -> Path:
    """The folder a ``file://`` source names."""
    return Path("/" + uri.location.lstrip("/"))


class LocalSource(Source):
    """``allowed_roots`` (real paths; the mirror service passes its ``--allow-local-root``
    folders) confines every file read to those folders: a file whose real path lies
    outside — a symlink to ``/etc/shadow`` — is left out of the listing, and checked
    again when it is opened. None (the CLI) reads wherever the links lead."""

    def __init__(self, uri: SourceURI, *, allowed_roots: tuple[str, ...] | None = None,
                 **_: object) -> None:
        super().__init__()
        self.uri = uri.uri
        self.root = local_source_path(uri)
        self.allowed_roots = allowed_roots
        if allowed_roots is not None and contained_root(self.root, allowed_roots) is None:
            raise SourceError(f"source {self.uri} is not inside an allowed folder",
                              source=self.uri)
        if not self.root.is_dir():
            raise SourceError(f"source {self.uri}: {self.root} is not a directory",
                              source=self.uri)

    def _allowed(self, path: str | Path) -> bool:
        return self.allowed_roots is None or \
            contained_root(path, self.allowed_roots) is not None

    def pin(self) -> dict[str, str]:
        return {"uri": self.uri}

    def list_files(self) -> list[SourceFile]:
        out: list[SourceFile] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)  # follows a symlink to its target
                except FileNotFoundError:
                    continue  # dangling link
                if not stat.S_ISREG(st.st_mode) or not self._allowed(full):
                    continue
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                fp = f"local:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                out.append(SourceFile(rel, st.st_size, fp, mode))
            # Symlinked directories appear in dirnames but os.walk does not descend them.
        return sorted(out, key=lambda f: f.path)

    def _path(self, file: SourceFile) -> Path:
        path = self.root / file.path
        if not self._allowed(path):  # a link swapped since the listing
            raise SourceError(f"source {self.uri}: {file.path} now leads outside the "
                              "allowed folders", source=self.uri, file=file.path)
        return path

    def read_range(self, file: SourceFile, start: int, end: int) -> bytes:
        with open(self._path(file), "rb") as f:
            return os.pread(f.fileno(), end - start, start)

    @contextmanager
    def local_file(self, file: SourceFile, spool_dir: Path) -> Iterator[Path]:
        yield self._path(file)
