"""Sources: where weights are mirrored from. One module per scheme, one interface.

:func:`open_source` maps a parsed ``source`` URI (and, for remote schemes, the secret
resolver) to a :class:`~bdn.sources.base.Source`. Remote schemes are imported lazily so
a local mirror does not pay for cloud SDKs, and a bdn installed without a scheme's extra
(``bdn[hf]``, ``bdn[s3]``, ``bdn[gcs]``) says which one to install.
"""

from __future__ import annotations

import importlib
from typing import Any

from bdn.config import SourceURI, parse_source
from bdn.errors import ConfigError
from bdn.sources.base import Source, SourceFile

__all__ = ["Source", "SourceFile", "open_source"]

# scheme → "module:Class"; each class takes (uri: SourceURI, **options).
SOURCE_CLASSES = {
    "file": "bdn.sources.local:LocalSource",
    "hf": "bdn.sources.hf:HFSource",
    "s3": "bdn.sources.s3:S3Source",
    "r2": "bdn.sources.s3:S3Source",
    "gs": "bdn.sources.gcs:GCSSource",
}
# scheme → the extra that installs its SDK (``pip install 'bdn[hf]'``).
SOURCE_EXTRAS = {"hf": "hf", "s3": "s3", "r2": "s3", "gs": "gcs"}
OWN_PACKAGES = frozenset({"bdn", "manifests"})


def open_source(uri: str | SourceURI, **options: Any) -> Source:
    """Open a source from ``scheme://...`` (or a bare local path)."""
    if isinstance(uri, str):
        if "://" not in uri:
            import os

            uri = "file://" + os.path.abspath(uri)
        uri = parse_source(uri)
    target = SOURCE_CLASSES.get(uri.scheme)
    if target is None:
        raise ConfigError(f"Source '{uri.uri}': the {uri.scheme}:// scheme is not supported "
                          f"by this bdn yet; supported: "
                          f"{', '.join(s + '://' for s in SOURCE_CLASSES)}", field="source")
    module, _, cls = target.partition(":")
    try:
        source_cls = getattr(importlib.import_module(module), cls)
        # Sources import some SDK modules only when constructed (s3fs, gcsfs).
        return source_cls(uri, **options)  # type: ignore[no-any-return]
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] in OWN_PACKAGES:
            raise  # our own code is broken: not a missing extra
        extra = SOURCE_EXTRAS.get(uri.scheme)
        hint = f"; install it with: pip install 'bdn[{extra}]'" if extra else ""
        raise ConfigError(f"Source '{uri.uri}': the {uri.scheme}:// source is not available "
                          f"({e.name} missing{hint})", field="source") from None
