"""Start a bdn service (or any server) as a child process and wait until it is ready.

Every bdn daemon prints ``BDN_LISTENING <url>`` once bound (``bdn serve`` also
``BDN_READY <url>`` once loaded; see :mod:`bdn.service`). :class:`ChildProcess` starts
a command in its own session, drains its output on a thread (so a chatty child never
blocks on a full pipe), and returns once the ready line appeared — no guessed ports, no
sleeps. It stops the whole session by PID. The demo and the tests both use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from bdn.errors import BdnError
from bdn.service import READY_PREFIX

START_TIMEOUT_S = 60.0


class ServiceStartError(BdnError, RuntimeError):
    """A child process exited or timed out before printing its ready line."""


class ChildProcess:
    """A child process whose stdout/stderr are drained into memory by a thread."""

    def __init__(self, cmd: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, ready_prefix: str | None = READY_PREFIX,
                 timeout_s: float = START_TIMEOUT_S) -> None:
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self.cmd = list(cmd)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self._ended = False
        self._prefix = ready_prefix
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env,
            cwd=cwd, start_new_session=True, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        if ready_prefix is not None:
            if not self._ready.wait(timeout_s) or self.url is None:
                self.stop()
                raise ServiceStartError(f"{self.cmd} did not become ready:\n{self.output}")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
            if self._prefix and self.url is None and line.startswith(self._prefix):
                self.url = line[len(self._prefix):].strip()
                self._ready.set()
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        self._ready.set()  # process ended: unblock a waiter

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, needle: str, timeout_s: float = START_TIMEOUT_S) -> str:
        """Block until a line containing ``needle`` has been printed (woken per line)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(needle in x for x in self.lines) or self._ended, timeout_s)
            for line in self.lines:
                if needle in line:
                    return line
        why = "process ended" if ok else "timed out"
        raise TimeoutError(f"no line with {needle!r} from {self.cmd} ({why}):\n{self.output}")

    def wait_count(self, needle: str, count: int, timeout_s: float = START_TIMEOUT_S) -> int:
        """Block until ``count`` lines containing ``needle`` were printed or the process
        ended; return how many were seen."""
        def seen() -> int:
            return sum(1 for x in self.lines if needle in x)
        with self._cond:
            if not self._cond.wait_for(lambda: seen() >= count or self._ended, timeout_s):
                raise TimeoutError(f"fewer than {count} lines with {needle!r} from {self.cmd}")
            return seen()

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            # The leader exited; children in its session may linger.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
