"""Progress display for long CLI work (rich bars on a terminal, nothing otherwise).

Every size the CLI shows, in bars and in summaries, is in binary units (KiB, MiB, GiB)
through :func:`human_bytes`, so a bar and the summary under it never disagree about
what "1.5 G" means. ``bdn -q`` turns every bar off through :func:`set_quiet`, called
once by ``bdn.cli.main``, so commands of other packages obey it without a flag of their
own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_quiet = False


def set_quiet(quiet: bool) -> None:
    """``bdn -q``: no progress bars for the rest of this process."""
    global _quiet
    _quiet = quiet


def quiet() -> bool:
    """Whether ``-q`` was given: decoration on stderr (bars, spinners) stays off."""
    return _quiet


def progress_enabled(console: Console) -> bool:
    """Whether a bar may be drawn on ``console``: a terminal, and ``-q`` not given."""
    return not _quiet and console.is_terminal


class BinaryTransferSpeedColumn(ProgressColumn):
    """rich's transfer speed in :func:`human_bytes` units (its own column is decimal)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else human_rate(speed), style="progress.data.speed")


def byte_columns(description: str = "[bold]{task.description}") -> list[ProgressColumn]:
    """The columns of every byte bar: description, bar, done/total, speed, time left."""
    return [TextColumn(description), BarColumn(), DownloadColumn(binary_units=True),
            BinaryTransferSpeedColumn(), TimeRemainingColumn()]


class ByteProgress:
    """Consumes ``{"event": "listed"|"bytes", ...}`` dicts and draws one byte bar."""

    def __init__(self, progress: Progress | None, description: str) -> None:
        self._p = progress
        self._desc = description
        self._task: TaskID | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if self._p is None:
            return
        kind = event.get("event")
        if kind == "listed":
            self._task = self._p.add_task(self._desc, total=event.get("bytes") or None)
        elif kind == "bytes" and self._task is not None:
            self._p.advance(self._task, event.get("n", 0))
        elif kind == "total" and self._task is not None:
            self._p.update(self._task, total=event.get("bytes"))


@contextmanager
def byte_progress(description: str, enabled: bool = True) -> Iterator[ByteProgress]:
    console = Console(stderr=True)
    if not enabled or not progress_enabled(console):
        yield ByteProgress(None, description)
        return
    with Progress(*byte_columns(), console=console, transient=True) as p:
        yield ByteProgress(p, description)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_rate(bytes_per_s: float) -> str:
    """A throughput in the units of :func:`human_bytes`: ``1.50 GiB/s``."""
    return f"{human_bytes(bytes_per_s)}/s"
