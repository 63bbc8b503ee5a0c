"""Stopping a transfer early: :class:`CancelToken`, :class:`AnyOf`, and the
:class:`MirrorCancelled` error every layer raises when it sees one set.

The error lives with the engine that raises it (a download checks the token before each
block and while it waits out a retry), not with the mirror above it, so the engine needs
no import of the mirror and the mirror re-raises the same class.
"""

from __future__ import annotations

import time
from typing import Protocol

from bdn.errors import MirrorError


class MirrorCancelled(MirrorError):
    """The mirror was cancelled; what was written so far stays valid and reusable."""


class CancelToken(Protocol):
    """What a download checks to stop early: a :class:`threading.Event` or :class:`AnyOf`."""

    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class AnyOf:
    """Set when any of its events is set (a job's cancel, or the source closing)."""

    POLL_S = 0.05

    def __init__(self, *events: CancelToken) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = self.POLL_S if deadline is None else min(self.POLL_S,
                                                            deadline - time.monotonic())
            if left <= 0:
                return False
            self.events[0].wait(left)
        return True


def check_cancelled(cancel: CancelToken | None, what: str) -> None:
    """Raise :class:`MirrorCancelled` (``what``: the work it stopped) once ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise MirrorCancelled(f"mirror cancelled while {what}")
