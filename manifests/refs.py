"""Refs: human names for manifests, ``<namespace>/<model>:<tag>``.

A ref is mutable (a tag moves when a model is re-mirrored); a manifest digest is not.
Refs become store keys (``refs/<namespace>/<model>/<tag>``), so each part is restricted
to a conservative character set that cannot form a path trick.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from manifests.errors import RefError

DEFAULT_TAG = "latest"
_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class Ref:
    namespace: str
    model: str
    tag: str = DEFAULT_TAG

    def __post_init__(self) -> None:
        for name in ("namespace", "model", "tag"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _PART_RE.fullmatch(value) or ".." in value:
                raise RefError(f"ref {name} {value!r} must be 1-128 letters, digits, '.', '_' "
                               "or '-', starting with a letter or digit", ref=str(value))

    @classmethod
    def parse(cls, text: str) -> Ref:
        if not isinstance(text, str) or "/" not in text:
            raise RefError(f"ref {text!r} must look like namespace/model[:tag]", ref=str(text))
        ns, _, rest = text.partition("/")
        model, sep, tag = rest.partition(":")
        return cls(ns, model, tag if sep else DEFAULT_TAG)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.model}:{self.tag}"

    @property
    def key(self) -> str:
        """The store key under ``refs/``."""
        return f"{self.namespace}/{self.model}/{self.tag}"
