"""The re-mirror key of a ``weights:`` entry, and the ref a mirror of it is stored under.

As in Truss, a ``weights:`` entry is mirrored again only when what it *asks for* changes:
the key is a hash of the source URI (with its ``@revision`` as written), the allow and
ignore patterns, and the auth block (secret *names* and OIDC identities, never secret
values). Two configs with the same entry share one mirror; changing the patterns or the
credentials used makes a new one. ``mount_location`` is deliberately not part of the key:
where files are mounted does not change which bytes are mirrored.

The key is the first 16 hex digits (64 bits) of the BLAKE3 of a canonical JSON document::

    {"auth": {...} | null, "ignore": [sorted, unique], "allow": [sorted, unique],
     "source": "<scheme lowercased>://<location>[@revision]", "v": 1}

Patterns are sets for selection (order does not change what is selected), so they are
sorted. An entry with patterns also carries ``"glob": "fnmatch"``: patterns once meant
that ``*`` stops at ``/``, and since they select as ``huggingface_hub`` does (see
:mod:`bdn.patterns`) a mirror made under the old meaning must not be reused. Entries
without patterns keep their keys. The node agent resolves an entry to :func:`mirror_ref` =
``mirrors/<key>:latest``; the mirror service writes that ref when a job names no ref.
"""

from __future__ import annotations

import json

import blake3

from bdn.config import WeightsEntry
from manifests.refs import Ref

MIRROR_KEY_VERSION = 1
MIRROR_KEY_HEX_DIGITS = 16
MIRROR_NAMESPACE = "mirrors"
MIRROR_TAG = "latest"
# What patterns mean (bdn.patterns); absent from keys made before "*" crossed "/".
PATTERN_SEMANTICS = "fnmatch"


def mirror_key_document(entry: WeightsEntry) -> dict[str, object]:
    """The canonical document hashed by :func:`mirror_key` (exposed for debugging)."""
    src = entry.source
    uri = f"{src.scheme}://{src.location}"
    if src.revision:
        uri += f"@{src.revision}"
    doc: dict[str, object] = {
        "v": MIRROR_KEY_VERSION,
        "source": uri,
        "allow": sorted(set(entry.allow_patterns)),
        "ignore": sorted(set(entry.ignore_patterns)),
        "auth": entry.auth.to_dict() if entry.auth else None,
    }
    if entry.allow_patterns or entry.ignore_patterns:
        doc["glob"] = PATTERN_SEMANTICS
    return doc


def mirror_key(entry: WeightsEntry) -> str:
    """A short, stable hex key for ``entry`` (16 hex digits)."""
    doc = json.dumps(mirror_key_document(entry), sort_keys=True, separators=(",", ":"))
    return blake3.blake3(doc.encode()).hexdigest()[:MIRROR_KEY_HEX_DIGITS]


def mirror_ref(entry: WeightsEntry) -> Ref:
    """``mirrors/<mirror_key(entry)>:latest`` — where the mirror of ``entry`` is found."""
    return Ref(MIRROR_NAMESPACE, mirror_key(entry), MIRROR_TAG)
