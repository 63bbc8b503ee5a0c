"""A second, small file system for tests: a tmpfs mounted on a test's directory.

Cross-device paths (``link``/``copy_file_range`` → ``EXDEV``) and full disks (``ENOSPC``)
need a real second file system of a known size; a tmpfs is one, costs only memory, and
is gone when unmounted. Mounting needs root (CAP_SYS_ADMIN): where it is refused, the
test is skipped with that reason rather than faked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

MiB = 1024 * 1024


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` on ``path`` (made if missing) for the block."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here: cannot make a second file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755",
                           "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy: a file a killed process had open must not keep the mount (and the test's
        # memory) alive past the test.
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(path: Path, leave_bytes: int = 0) -> int:
    """Write ``path`` until its file system has about ``leave_bytes`` free (all of it
    with 0); returns the bytes written. The test owns the file and removes it."""
    block = b"\0" * MiB
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while (want := free_bytes(path) - leave_bytes) > 0:
            try:
                written += os.write(fd, block[:min(len(block), want)])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return written


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
