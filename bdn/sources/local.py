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
from bdn.sources.base import Source, SourceFile


class LocalSource(Source):
    def __init__(self, uri: SourceURI, **_: object) -> None:
        super().__init__()
        self.uri = uri.uri
        self.root = Path("/" + uri.location.lstrip("/"))
        if not self.root.is_dir():
            raise SourceError(f"source {self.uri}: {self.root} is not a directory",
                              source=self.uri)

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
                if not stat.S_ISREG(st.st_mode):
                    continue
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                fp = f"local:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                out.append(SourceFile(rel, st.st_size, fp, mode))
            # Symlinked directories appear in dirnames but os.walk does not descend them.
        return sorted(out, key=lambda f: f.path)

    def _path(self, file: SourceFile) -> Path:
        return self.root / file.path

    def read_range(self, file: SourceFile, start: int, end: int) -> bytes:
        with open(self._path(file), "rb") as f:
            return os.pread(f.fileno(), end - start, start)

    @contextmanager
    def local_file(self, file: SourceFile, spool_dir: Path) -> Iterator[Path]:
        yield self._path(file)
