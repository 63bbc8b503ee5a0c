"""Start real service processes for tests and stop them by PID.

A service announces readiness with one stdout line (``BDN_LISTENING <url>``, see
``bdn.service``); :class:`ServiceProcess` (``bdn.childproc.ChildProcess``, shared with
the demo) waits for that line, so tests never guess ports or sleep. Third-party servers
(moto, fake-gcs-server, nginx) that print nothing useful are started on a free port and
probed until they answer (``wait_http``). Every process runs in its own session so
teardown can kill it and its children.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

from bdn.childproc import START_TIMEOUT_S, ChildProcess


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bdn_command(*args: str) -> list[str]:
    """The ``bdn`` CLI run with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "bdn.cli", *args]


ServiceProcess = ChildProcess


def wait_http(url: str, timeout_s: float = START_TIMEOUT_S,
              proc: ServiceProcess | None = None) -> None:
    """Probe ``url`` until any HTTP answer comes back (for servers that announce nothing)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.cmd} exited:\n{proc.output}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s: {last}")


@contextlib.contextmanager
def service(cmd: Sequence[str], **kw: object) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(cmd, **kw)  # type: ignore[arg-type]
    try:
        yield proc
    finally:
        proc.stop()
