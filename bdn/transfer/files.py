"""What the transfer engine knows of a remote file: :class:`SourceFile` (path, size,
fingerprint), the :data:`Fetch` callable that streams its bytes, the :class:`Checksum`
they must hash to, and the :class:`FetchCounters` of bytes read from the origin.

These records are defined here, below the source adapters, so the engine (spool,
stream, ranged reads) can take them without importing any source: adapters build them,
the engine consumes them (:mod:`bdn.sources.base` re-exports the two that sources use).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from bdn.transfer.crc import CrcHasher, CrcKind


@dataclass(frozen=True)
class SourceFile:
    """A file at the source. ``path`` is relative, ``/``-separated."""

    path: str
    size: int
    fingerprint: str | None = None
    mode: int = 0o644


@dataclass
class FetchCounters:
    """Bytes actually read from the origin (for "bytes from origin" reporting)."""

    bytes_from_origin: int = 0


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> Any: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class Checksum:
    """What the downloaded bytes must hash to: ``new()`` makes a fresh hasher whose
    ``hexdigest()`` must equal ``expected_hex``. ``crc``: set for a CRC, which can also be
    computed per piece and combined (:mod:`bdn.transfer.crc`)."""

    kind: str
    expected_hex: str
    new: Callable[[], Hasher]
    crc: CrcKind | None = None

    @classmethod
    def of_crc(cls, crc: CrcKind, expected_b64: str) -> Checksum:
        return cls(crc.name, expected_b64, lambda: CrcHasher(crc), crc=crc)


Fetch = Callable[[int, int], Iterator[bytes]]
"""``fetch(start, end)`` yields bytes ``[start, end)`` in blocks; it raises
:class:`~bdn.retry.RetryableError` for transient failures and
:class:`~bdn.errors.SourceError` (or :class:`~bdn.errors.AuthError`) for final ones."""
