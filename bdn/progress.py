"""Progress display for long CLI work (rich bars on a terminal, nothing otherwise)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


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
    if not enabled or not console.is_terminal:
        yield ByteProgress(None, description)
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as p:
        yield ByteProgress(p, description)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
