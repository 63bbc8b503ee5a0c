"""Ranged reads that survive the network: one byte range fetched, retried and *resumed*.

A request that fails (timeout, reset, 5xx, 408, 429) is retried under the shared
:class:`~bdn.retry.RetryPolicy` (capped exponential backoff, full jitter, ``Retry-After``
as a floor) and resumed: the next request asks for ``Range`` from the first byte not yet
taken, so a dropped connection costs only what was in flight. Every request holds one
slot of each semaphore it is given (a source's cap across its files, the mirror
service's global cap across jobs); a cancel stops it before the next block and wakes a
backoff sleep at once. The spool (:mod:`bdn.transfer.spool`) and the stream
(:mod:`bdn.transfer.stream`) are both built on :func:`fetch_resumable`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from bdn.errors import SourceError
from bdn.retry import RetryableError, RetryPolicy, retry_sync
from bdn.secrets import scrub
from bdn.transfer.cancel import CancelToken, MirrorCancelled, check_cancelled
from bdn.transfer.files import Fetch, FetchCounters, SourceFile
from bdn.transfer.options import DownloadOptions

log = logging.getLogger(__name__)

T = TypeVar("T")


@contextmanager
def holding(slots: Sequence[threading.Semaphore]) -> Iterator[None]:
    """Hold one slot of each semaphore for a request: acquired in the given order (always
    the same, so waiters cannot deadlock), released in reverse."""
    with contextlib.ExitStack() as stack:
        for slot in slots:
            stack.enter_context(slot)
        yield


def fetch_resumable(fetch: Fetch, start: int, end: int, take: Callable[[int, bytes], None],
                    *, source_uri: str, file: SourceFile, options: DownloadOptions,
                    counters: FetchCounters, counter_lock: threading.Lock,
                    cancel: CancelToken | None = None,
                    request_slots: Sequence[threading.Semaphore] = (),
                    check: Callable[[], None] | None = None) -> None:
    """Bytes ``[start, end)`` of ``file``, each block handed to ``take(offset, block)`` in
    order. A failed request is retried under ``options.retry`` and *resumed* from the
    first byte not taken, so a dropped connection costs only what was in flight. Every
    request holds one slot of each of ``request_slots``; ``check`` (and the cancel) is
    asked before each block. Raises :class:`SourceError` naming the source and file when
    the last attempt fails."""
    pos = start

    def attempt() -> None:
        nonlocal pos
        if check is not None:
            check()
        check_cancelled(cancel, f"downloading {file.path}")
        if pos >= end:
            return
        with holding(request_slots):
            for block in fetch(pos, end):
                if check is not None:
                    check()
                check_cancelled(cancel, f"downloading {file.path}")
                n = len(block)
                if pos + n > end:
                    raise SourceError(f"{file.path} from {source_uri}: origin sent more "
                                      "bytes than asked for", source=source_uri,
                                      file=file.path)
                with counter_lock:
                    counters.bytes_from_origin += n
                take(pos, block)
                pos += n
        if pos < end:
            raise RetryableError(f"short read: connection ended at byte {pos} of "
                                 f"[{start}, {end})")

    def on_retry(n: int, e: BaseException, delay: float) -> None:
        log.warning("%s from %s bytes [%d, %d): attempt %d failed (%s); resuming at byte %d "
                    "in %.2fs", file.path, source_uri, start, end, n, scrub(str(e)), pos,
                    delay)

    try:
        retry_cancellable(attempt, options.retry, cancel, on_retry=on_retry)
    except RetryableError as e:
        raise SourceError(f"{file.path} from {source_uri}: giving up after "
                          f"{options.retry.attempts} attempts: {scrub(str(e))}",
                          source=source_uri, file=file.path, status=e.status) from None


def retry_or_fail(attempt: Callable[[], T], policy: RetryPolicy, *, uri: str, what: str,
                  path: str = "") -> T:
    """:func:`retry_sync` for a source's metadata call (listing, model info): when the
    attempts are spent, a :class:`SourceError` naming the source, the call and the file."""
    try:
        return retry_sync(attempt, policy)
    except RetryableError as e:
        raise SourceError(f"source {uri}: {what} failed after {policy.attempts} attempts: "
                          f"{e}", source=uri, file=path, status=e.status) from None


def retry_cancellable(fn: Callable[[], T], policy: RetryPolicy,
                      cancel: CancelToken | None, *,
                      on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
    """:func:`bdn.retry.retry_sync`, but a cancel wakes the backoff sleep at once, so a
    job waiting out a long ``Retry-After`` can still be cancelled promptly."""
    if cancel is None:
        return retry_sync(fn, policy, on_retry=on_retry)

    def sleep(delay_s: float) -> None:
        if cancel.wait(delay_s):
            raise MirrorCancelled("mirror cancelled while waiting to retry") from None

    return retry_sync(fn, policy, on_retry=on_retry, sleep=sleep)


def transport_error(exc: BaseException, where: str) -> RetryableError:
    """A failure worth another attempt (refused, reset, timed out, cut short, a 5xx),
    which resumes where this one stopped; the message is scrubbed of secrets."""
    return RetryableError(f"{where}: {type(exc).__name__}: {scrub(str(exc))}")
