"""How remote bytes are fetched: :class:`DownloadOptions` and the defaults behind them.

One frozen record, validated on construction, is passed from the mirror's options (the
CLI, the mirror service's flags) down to every request, so a limit is set in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from bdn.retry import RetryPolicy

MiB = 1024 * 1024
# Large enough that per-request costs (latency, billing, stores that read a whole object
# for every ranged GET) stay small; small enough that 8 of them keep a single large file
# on several connections, and that chunks waiting for the in-order checksum stay few.
DEFAULT_PART_BYTES = 32 * MiB
DEFAULT_CONCURRENCY = 8
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_RETRY = RetryPolicy(attempts=6, base_delay_s=0.2, max_delay_s=10.0)


@dataclass(frozen=True)
class DownloadOptions:
    """How remote files are fetched. Sizes in bytes, times in seconds."""

    part_bytes: int = DEFAULT_PART_BYTES
    concurrency: int = DEFAULT_CONCURRENCY
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    # Longest wait for the next byte of a response; a stalled stream is a failed one.
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    retry: RetryPolicy = DEFAULT_RETRY
    verify: bool = True

    def __post_init__(self) -> None:
        if self.part_bytes < 64 * 1024:
            raise ValueError("DownloadOptions.part_bytes must be ≥ 64 KiB")
        if not 1 <= self.concurrency <= 256:
            raise ValueError("DownloadOptions.concurrency must be in [1, 256]")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("DownloadOptions timeouts must be > 0")


# The block a response is read in: large enough that per-block costs (hash, write, GIL
# round trips) stay small, small enough to stay in the CPU cache while it is consumed.
STREAM_BLOCK_BYTES = 1024 * 1024
