"""Cloud filesystems that both the blob store and the sources open.

The store (:mod:`bdn.store`) sits below the sources and must not import one, yet both
open gcsfs with the same care for custom endpoints; the choice lives here, once.
SDKs are imported when called, so importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any


def gcs_filesystem_class(endpoint_url: str | None) -> Any:
    """gcsfs's core class for a custom endpoint (emulators, compatible stores), where the
    default class's gRPC bucket-type probe waits 60 s per call; the default otherwise."""
    if endpoint_url:
        from gcsfs.core import GCSFileSystem
        return GCSFileSystem
    from gcsfs import GCSFileSystem as DefaultGCSFileSystem
    return DefaultGCSFileSystem
