"""Readiness sources: which byte ranges of which weight files are verified on disk.

The loader does not care where bytes come from; it asks one question before it reads a
range: "are bytes [begin, end) of this file verified yet?", and waits when they are not.
A :class:`ReadinessSource` answers it. Three implementations:

* :class:`FilesReady` — every file is complete already (weights on disk, a pre-warmed
  mount, ``--weights-dir``): no waiting at all.
* :class:`ProgressiveReadiness` — fed in process by whoever writes the files (tests, a
  future in-process puller): ``mark(path, begin, end)``, ``mark_complete(path)``,
  ``finish()``, ``fail(message)``.
* :class:`EventStreamReadiness` — consumes the node agent's newline-delimited JSON
  event stream (``GET /v1/pulls/{id}/events``) over TCP or a unix socket, in a thread
  (through :mod:`bdn.httpclient`, which streams the lines as they arrive).

The interface is synchronous and thread-safe because the loader's readers are threads
(``preadv`` releases the GIL; asyncio would add nothing but a hop). Paths are logical
absolute paths (the mount root joined with the file's relative path); a source may say
that a file's bytes are, for now, on disk elsewhere (``disk_path``: the agent writes a
partial file and renames it when verified, and an inode survives a rename, so a reader
that opened the partial file keeps reading the right bytes).

Events are the agent's typed records (:mod:`agent.events`, the one module of the agent
the serving runtime may import), parsed line by line with :func:`agent.events.from_line`.
This reader acts on ``plan`` (the file list and sizes), ``chunk`` (verified ranges, and
the partial file they are in), ``file`` (complete at its logical path), ``done`` and
``error``; a kind it does not act on, or one a newer agent added, is skipped, and a
malformed event fails the source with an error naming the field.

A ``plan`` lets the loader list a folder before any file is complete; without one, a
folder's listing is known only at ``done`` (so give the loader an index or explicit
files, or have the agent send the plan first).
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from agent.events import ChunkVerified, Done, Error, Event, FilePublished, Plan, from_line
from bdn.httpclient import ErrorMap, Failure, HttpClient, StreamResponse, split_url
from serving.errors import ReadinessTimeout, WeightsUnavailableError

# The event stream of a live pull may be quiet for a long time (a slow link, a large
# chunk); the connection itself is only given this long to open.
CONNECT_TIMEOUT_S = 10.0
# One event line is small; a longer line is a broken or hostile stream.
MAX_EVENT_LINE_BYTES = 1 << 20


@runtime_checkable
class ReadinessSource(Protocol):
    """Which byte ranges of which files are verified; see the module docstring."""

    def wait_range(self, path: str, begin: int, end: int, *,
                   timeout_s: float | None = None) -> str:
        """Block until ``[begin, end)`` of ``path`` is verified; return where to read it.

        Raises :class:`WeightsUnavailableError` if the source failed, finished without
        these bytes, or ``timeout_s`` passed.
        """
        ...

    def wait_complete(self, path: str, *, timeout_s: float | None = None) -> str:
        """Block until all of ``path`` is verified; return where to read it."""
        ...

    def file_size(self, path: str) -> int | None:
        """The file's final size if the source knows it (else the loader uses fstat)."""
        ...

    def listing(self, root: str, *, timeout_s: float | None = None) -> list[str] | None:
        """All files under ``root`` once the set is final, or None: "look at the disk"."""
        ...

    def close(self) -> None:
        ...


def normalize(path: str | os.PathLike[str], root: str | None = None) -> str:
    """The logical key of a path: absolute and normalised (relative ones join ``root``)."""
    p = os.fspath(path)
    if not os.path.isabs(p):
        p = os.path.join(root or os.getcwd(), p)
    return os.path.normpath(p)


class FilesReady:
    """Every file is complete on disk: answers at once, never waits."""

    def wait_range(self, path: str, begin: int, end: int, *,
                   timeout_s: float | None = None) -> str:
        return path

    def wait_complete(self, path: str, *, timeout_s: float | None = None) -> str:
        return path

    def file_size(self, path: str) -> int | None:
        return None

    def listing(self, root: str, *, timeout_s: float | None = None) -> list[str] | None:
        return None

    def close(self) -> None:
        pass


class RangeSet:
    """Disjoint, sorted, half-open byte ranges; adjacent ranges are merged."""

    __slots__ = ("_begins", "_ends")

    def __init__(self) -> None:
        self._begins: list[int] = []
        self._ends: list[int] = []

    def add(self, begin: int, end: int) -> None:
        if end <= begin:
            return
        # First range that could touch [begin, end): the one whose end >= begin.
        i = bisect.bisect_left(self._ends, begin)
        j = i
        while j < len(self._begins) and self._begins[j] <= end:
            begin = min(begin, self._begins[j])
            end = max(end, self._ends[j])
            j += 1
        self._begins[i:j] = [begin]
        self._ends[i:j] = [end]

    def covers(self, begin: int, end: int) -> bool:
        if end <= begin:
            return True
        i = bisect.bisect_right(self._begins, begin) - 1
        return i >= 0 and self._ends[i] >= end

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._begins, self._ends, strict=True))

    def covered_bytes(self) -> int:
        return sum(e - b for b, e in zip(self._begins, self._ends, strict=True))


@dataclass
class _FileState:
    ranges: RangeSet = field(default_factory=RangeSet)
    complete: bool = False
    size: int | None = None
    disk_path: str | None = None


class ProgressiveReadiness:
    """An in-process readiness source fed by the writer of the files.

    ``root`` anchors relative paths (as the agent's events are relative to the mount).
    Every method is thread-safe; waiters wake on every change.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = normalize(root) if root is not None else None
        self._cond = threading.Condition()
        self._files: dict[str, _FileState] = {}
        self._planned: set[str] | None = None
        self._done = False
        self._error: str | None = None

    # -- the writer's side -------------------------------------------------------------
    def key(self, path: str | os.PathLike[str]) -> str:
        return normalize(path, self.root)

    def _state(self, key: str) -> _FileState:
        st = self._files.get(key)
        if st is None:
            st = self._files[key] = _FileState()
        return st

    def plan(self, files: dict[str, int | None]) -> None:
        """Announce the complete set of files (path → size, if known) up front."""
        with self._cond:
            self._planned = set()
            for path, size in files.items():
                k = self.key(path)
                self._planned.add(k)
                if size is not None:
                    self._state(k).size = size
            self._cond.notify_all()

    def mark(self, path: str | os.PathLike[str], begin: int, end: int, *,
             size: int | None = None, disk_path: str | None = None) -> None:
        """Bytes ``[begin, end)`` of ``path`` are verified on disk."""
        if begin < 0 or end < begin:
            raise ValueError(f"bad range [{begin}, {end})")
        with self._cond:
            st = self._state(self.key(path))
            st.ranges.add(begin, end)
            if size is not None:
                st.size = size
            if disk_path is not None:
                st.disk_path = disk_path
            self._cond.notify_all()

    def mark_complete(self, path: str | os.PathLike[str], *, size: int | None = None) -> None:
        """All of ``path`` is verified and in place at its logical path."""
        with self._cond:
            st = self._state(self.key(path))
            st.complete = True
            st.disk_path = None
            if size is not None:
                st.size = size
            self._cond.notify_all()

    def finish(self) -> None:
        """The writer is done: any range not covered by now never will be."""
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def fail(self, message: str) -> None:
        """The writer failed: every waiter gets :class:`WeightsUnavailableError`."""
        with self._cond:
            if self._error is None:
                self._error = message
            self._cond.notify_all()

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def done(self) -> bool:
        return self._done

    # -- the reader's side -------------------------------------------------------------
    def _wait(self, key: str, pred: object, what: tuple[int, int] | None,
              timeout_s: float | None) -> str:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        begin, end = what if what is not None else (None, None)
        with self._cond:
            while True:
                st = self._files.get(key)
                if st is not None and pred(st):  # type: ignore[operator]
                    return st.disk_path or key
                if self._error is not None:
                    raise WeightsUnavailableError(f"the weights pull failed: {self._error}",
                                                  path=key, begin=begin, end=end)
                if self._done:
                    raise WeightsUnavailableError("the weights pull finished without these "
                                                  "bytes", path=key, begin=begin, end=end)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ReadinessTimeout(f"not verified within {timeout_s} s",
                                           path=key, begin=begin, end=end)
                self._cond.wait(remaining)

    def wait_range(self, path: str, begin: int, end: int, *,
                   timeout_s: float | None = None) -> str:
        return self._wait(self.key(path),
                          lambda st: st.complete or st.ranges.covers(begin, end),
                          (begin, end), timeout_s)

    def wait_complete(self, path: str, *, timeout_s: float | None = None) -> str:
        def whole(st: _FileState) -> bool:
            return st.complete or (st.size is not None and st.ranges.covers(0, st.size))
        return self._wait(self.key(path), whole, None, timeout_s)

    def file_size(self, path: str) -> int | None:
        with self._cond:
            st = self._files.get(self.key(path))
            return st.size if st is not None else None

    def listing(self, root: str, *, timeout_s: float | None = None) -> list[str] | None:
        key = normalize(root, self.root)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._planned is None and not self._done and self._error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ReadinessTimeout(
                        f"the list of files was not known within {timeout_s} s", path=key)
                self._cond.wait(remaining)
            if self._planned is None and self._error is not None:
                raise WeightsUnavailableError(f"the weights pull failed: {self._error}",
                                              path=key)
            names = self._planned if self._planned is not None else set(self._files)
            prefix = key.rstrip(os.sep) + os.sep
            return sorted(n for n in names if n.startswith(prefix))

    def close(self) -> None:
        pass


class EventStreamReadiness(ProgressiveReadiness):
    """Readiness from the node agent's NDJSON event stream, read by a daemon thread.

    ``url`` is ``http://host:port/v1/pulls/{id}/events`` or, for the agent's unix
    socket, ``http+unix://<percent-encoded socket path>/v1/pulls/{id}/events``. Event
    paths are relative to ``root`` (the mount location) and must stay inside it.
    """

    def __init__(self, url: str, root: str | os.PathLike[str], *,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__(root)
        self.url = url
        self._http = _client(url, connect_timeout_s)
        self._target = split_url(url)[1]
        self._resp: StreamResponse | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="bdn-readiness", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            # Streaming responses must not time out between events (read_timeout_s=None);
            # the connection and the answer's headers get connect_timeout_s.
            with self._http.stream("GET", self._target,
                                   headers={"Accept": "application/x-ndjson"},
                                   read_timeout_s=None, ok=lambda s: s == 200) as resp:
                self._resp = resp
                if self._closed:
                    return
                for line in resp.lines(MAX_EVENT_LINE_BYTES):
                    if line.strip() and self._handle(from_line(line)):
                        return
            if not self._closed:
                self.fail("the event stream ended before the pull was done")
        except Exception as e:  # the thread must report, never die silently
            if not self._closed:
                self.fail(f"{type(e).__name__}: {e}" if not isinstance(
                    e, WeightsUnavailableError) else str(e))
        finally:
            self._http.close()

    def _rel(self, path: str) -> str:
        if not path or os.path.isabs(path) or "\x00" in path:
            raise ValueError(f"event has a bad path: {path!r}")
        key = self.key(path)
        assert self.root is not None
        if not key.startswith(self.root.rstrip(os.sep) + os.sep):
            raise ValueError(f"event path {path!r} escapes the mount root")
        return key

    def _handle(self, ev: Event | None) -> bool:
        """Apply one event (None: a kind this reader does not know); True when the
        stream is over."""
        if isinstance(ev, ChunkVerified):
            disk = ev.disk_path
            self.mark(self._rel(ev.path), ev.offset, ev.offset + ev.length, size=ev.size,
                      disk_path=disk if disk is not None and os.path.isabs(disk) else None)
        elif isinstance(ev, FilePublished):
            self.mark_complete(self._rel(ev.path), size=ev.size)
        elif isinstance(ev, Plan):
            self.plan({self._rel(f.path): f.size for f in ev.files})
        elif isinstance(ev, Done):
            self.finish()
            return True
        elif isinstance(ev, Error):
            self.fail(ev.message or "the agent reported an error")
            return True
        return False

    def close(self) -> None:
        self._closed = True
        resp = self._resp
        if resp is not None:
            resp.abort()
        self._thread.join(5)


def _client(url: str, timeout_s: float) -> HttpClient:
    parts = urlsplit(url)
    if not ((parts.scheme == "http+unix" and parts.netloc)
            or (parts.scheme == "http" and parts.hostname)):
        raise WeightsUnavailableError(
            "the event stream URL must be http://HOST:PORT/... or "
            "http+unix://<percent-encoded socket path>/...", path=url)
    errors = ErrorMap(other=lambda f: _answered(url, f))
    return HttpClient(split_url(url)[0], timeout_s=timeout_s, errors=errors)


def _answered(url: str, failure: Failure) -> WeightsUnavailableError:
    body = failure.body[:2048].decode("utf-8", "replace").strip()
    return WeightsUnavailableError(f"event stream answered {failure.status}: {body}",
                                   path=url)
