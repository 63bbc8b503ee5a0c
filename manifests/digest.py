"""Content digests: ``b3:<64 hex>``, the BLAKE3 of the uncompressed bytes.

BLAKE3 because content addresses are shared across models and tenants and must be
collision resistant, and because it is fast (about 4.8 GB/s a core here, against 1.8 GB/s
for SHA-256). A :class:`Digest` is a small immutable value; parsing is strict so a typo
or a hostile string never reaches a path on disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import blake3

from manifests.errors import DigestError, IntegrityError

ALGORITHM = "b3"
HEX_LENGTH = 64
_DIGEST_RE = re.compile(r"b3:([0-9a-f]{64})")
# Above this size hashing is spread over threads; below it the thread start costs more.
PARALLEL_HASH_MIN_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """A BLAKE3 content address. ``str(d)`` is ``b3:<hex>``."""

    hex: str

    def __post_init__(self) -> None:
        if len(self.hex) != HEX_LENGTH or not all(c in "0123456789abcdef" for c in self.hex):
            raise DigestError(f"invalid digest hex {self.hex!r}: want {HEX_LENGTH} lowercase "
                              "hex characters", digest=self.hex)

    @classmethod
    def parse(cls, text: Any) -> Digest:
        if isinstance(text, Digest):
            return text
        if not isinstance(text, str):
            raise DigestError("digest must be a string like 'b3:<64 hex>', got "
                              f"{type(text).__name__}")
        m = _DIGEST_RE.fullmatch(text)
        if not m:
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise DigestError(f"invalid digest {shown!r}: want 'b3:' followed by 64 lowercase "
                              "hex characters", digest=shown)
        return cls(m.group(1))

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        """Digest of a buffer; large buffers are hashed on several threads."""
        threads = blake3.blake3.AUTO if len(data) >= PARALLEL_HASH_MIN_BYTES else 1
        return cls(blake3.blake3(data, max_threads=threads).hexdigest())

    def __str__(self) -> str:
        return f"{ALGORITHM}:{self.hex}"

    def __repr__(self) -> str:
        return f"Digest('{self}')"

    @property
    def short(self) -> str:
        return f"{ALGORITHM}:{self.hex[:12]}"

    def verify(self, data: bytes | bytearray | memoryview, *, where: str = "") -> None:
        """Raise :class:`IntegrityError` unless ``data`` hashes to this digest."""
        actual = Digest.of(data)
        if actual != self:
            raise IntegrityError(str(self), str(actual), where=where)


class Hasher:
    """Incremental BLAKE3 for streams (e.g. a fill arriving over HTTP)."""

    __slots__ = ("_h", "length")

    def __init__(self) -> None:
        self._h = blake3.blake3()
        self.length = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.length += len(data)

    def digest(self) -> Digest:
        return Digest(self._h.hexdigest())
