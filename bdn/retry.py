"""Retry policy: capped exponential backoff with full jitter, honouring ``Retry-After``.

The policy is pure — :meth:`RetryPolicy.delay_s` is a function of the attempt number, the
server's ``Retry-After`` (if any) and a random draw passed in — so it is tested without
clocks; :func:`retry_sync` is the thin loop that sleeps. Which failures are worth
retrying is decided here once for every client in bdn: transport errors and HTTP 408,
429 and 5xx; never other 4xx (a wrong key stays wrong).
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_ATTEMPTS = 5
DEFAULT_BASE_DELAY_S = 0.2
DEFAULT_MAX_DELAY_S = 10.0
# A server asking for more than this is treated as "down", not as a schedule to follow.
MAX_RETRY_AFTER_S = 60.0


class RetryableError(Exception):
    """Raise (or wrap) to mark a failure as worth another attempt."""

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or 500 <= status <= 599


def parse_retry_after(value: str | None, *, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now_s is None else now_s
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = DEFAULT_ATTEMPTS
    base_delay_s: float = DEFAULT_BASE_DELAY_S
    max_delay_s: float = DEFAULT_MAX_DELAY_S
    max_retry_after_s: float = MAX_RETRY_AFTER_S

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be ≥ 1")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("RetryPolicy: need 0 ≤ base_delay_s ≤ max_delay_s")

    def delay_s(self, attempt: int, *, retry_after_s: float | None = None,
                draw: float = 1.0) -> float:
        """Delay before attempt ``attempt + 1`` (``attempt`` counts from 1).

        Full jitter (``draw`` in [0, 1]) spreads a thundering herd of clients; a server's
        ``Retry-After`` is a floor, capped so a hostile value cannot stall us.
        """
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        delay = cap * min(max(draw, 0.0), 1.0)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_retry_after_s))
        return delay


def _delay_after(policy: RetryPolicy, attempt: int, error: BaseException,
                 rng: random.Random,
                 on_retry: Callable[[int, BaseException, float], None] | None) -> float:
    """The wait before the next attempt; re-raises ``error`` when attempts are spent."""
    if attempt >= policy.attempts:
        raise error
    delay = policy.delay_s(attempt, retry_after_s=getattr(error, "retry_after_s", None),
                           draw=rng.random())
    if on_retry:
        on_retry(attempt, error, delay)
    return delay


def retry_sync(fn: Callable[[], T], policy: RetryPolicy, *,
               retry_on: tuple[type[BaseException], ...] = (RetryableError,),
               on_retry: Callable[[int, BaseException, float], None] | None = None,
               rng: random.Random | None = None,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()`` until it succeeds or the attempts are spent; ``sleep`` waits out each
    backoff (one that can be woken, to cancel, may raise instead)."""
    rng = rng or random.Random()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except retry_on as e:
            sleep(_delay_after(policy, attempt, e, rng, on_retry))
    raise AssertionError("unreachable")
