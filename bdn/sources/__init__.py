"""Sources: where weights are mirrored from. One module per scheme, one interface.

:func:`open_source` maps a parsed ``source`` URI (and, for remote schemes, the secret
resolver) to a :class:`~bdn.sources.base.Source`. Remote schemes are imported lazily so
a local mirror does not pay for cloud SDKs.
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
    except ModuleNotFoundError as e:
        raise ConfigError(f"Source '{uri.uri}': the {uri.scheme}:// source is not available "
                          f"({e.name} missing)", field="source") from None
    return source_cls(uri, **options)  # type: ignore[no-any-return]
