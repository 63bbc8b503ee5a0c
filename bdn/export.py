"""Write a manifest's files out of the store into a directory, verifying every chunk.

The simple read path (the node agent is the fast one): each file is assembled in a
temporary file beside its target, every chunk checked against its digest and the whole
file against its own, then renamed into place, so a reader never sees a partial or
unverified file. Files that share a digest are written once and hardlinked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdn.fsutil import check_root, safe_target, temp_name
from bdn.store import BlobStore, verify_chunk
from manifests.digest import Digest
from manifests.manifest import Manifest


@dataclass
class ExportStats:
    files: int = 0
    bytes_written: int = 0
    hardlinks: int = 0


def export_manifest(store: BlobStore, manifest: Manifest, dest: str | Path, *,
                    progress: Callable[[dict[str, Any]], None] | None = None) -> ExportStats:
    emit = progress or (lambda _e: None)
    root = check_root(Path(dest))
    stats = ExportStats()
    written: dict[Digest, Path] = {}
    for entry in manifest.files:
        target = safe_target(root, entry.path)
        tmp = temp_name(target)
        try:
            if entry.digest in written:
                os.link(written[entry.digest], tmp)
                stats.hardlinks += 1
            else:
                with open(tmp, "wb") as f:
                    for chunk in entry.chunks:
                        data = store.get_object(chunk.digest, verify=False)
                        verify_chunk(chunk, data, where=f"{entry.path} @ {chunk.offset}")
                        f.write(data)
                        stats.bytes_written += len(data)
                        emit({"event": "bytes", "path": entry.path, "n": len(data)})
                # Every chunk is verified and the file digest is the hash of the chunk
                # list (checked when the manifest was parsed): the file is exact.
                os.chmod(tmp, entry.mode)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        written.setdefault(entry.digest, target)
        stats.files += 1
        emit({"event": "file", "path": entry.path})
    return stats
