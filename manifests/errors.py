"""The one root of every error bdn raises, and the errors of the pure core.

Every package derives its errors from :class:`BdnError`, so a caller can catch one type
and still learn *what* was wrong: each subclass carries the field, path, byte offset,
URL or digest involved as attributes, not only in its message. The root lives here,
in the package that imports nothing of ours, so every other package can share it.
"""

from __future__ import annotations


class BdnError(Exception):
    """Root of all bdn errors. ``str(err)`` is a complete, user-facing sentence."""


class DigestError(BdnError, ValueError):
    """A digest string is malformed, or bytes do not match the digest they claim."""

    def __init__(self, message: str, *, digest: str | None = None) -> None:
        super().__init__(message)
        self.digest = digest


class IntegrityError(DigestError):
    """Bytes were read whose BLAKE3 differs from the digest that names them."""

    def __init__(self, expected: str, actual: str, *, where: str = "") -> None:
        place = f" ({where})" if where else ""
        super().__init__(f"digest mismatch{place}: expected {expected}, got {actual}",
                         digest=expected)
        self.expected = expected
        self.actual = actual
        self.where = where


class ManifestError(BdnError, ValueError):
    """A manifest document is invalid; names the record (e.g. ``files[3]``) and field."""

    def __init__(self, message: str, *, record: str = "", field: str = "") -> None:
        where = ".".join(p for p in (record, field) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.record = record
        self.field = field


class PathError(ManifestError):
    """A relative path is absolute, escapes its root, or is not normalised."""


class RefError(BdnError, ValueError):
    """A ref (``namespace/model:tag``) is malformed or names nothing."""

    def __init__(self, message: str, *, ref: str = "") -> None:
        super().__init__(message)
        self.ref = ref


class SafetensorsError(BdnError, ValueError):
    """A safetensors file is malformed; names the file, tensor and byte offset."""

    def __init__(self, message: str, *, path: str = "", tensor: str | None = None,
                 offset: int | None = None) -> None:
        parts = [p for p in (path, f"tensor {tensor!r}" if tensor else "",
                             f"byte offset {offset}" if offset is not None else "") if p]
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.tensor = tensor
        self.offset = offset
