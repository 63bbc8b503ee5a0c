"""Which manifest a ``weights:`` entry names: the one documented mapping.

The mirror service (``bdn/mirror_key.py``) stores the mirror of an entry under
``mirrors/<mirror_key(entry)>:latest``, where the key hashes the source URI (with its
revision), the allow/ignore patterns and the auth block — never the mount location.
The agent resolves an entry the same way unless the request names a ``ref`` (or a
manifest digest) for it explicitly; so a pod that runs a Truss ``config.yaml`` finds
its weights without knowing any ref, and an operator can still pin an exact manifest.

The agent applies the entry's allow/ignore patterns to the manifest's files again on
the node (``select_files``): mirroring with patterns keeps only matching files anyway,
but a manifest given explicitly may hold more than the entry asks for.
"""

from __future__ import annotations

from bdn.config import WeightsEntry
from bdn.mirror_key import mirror_ref
from bdn.patterns import select
from manifests.digest import Digest
from manifests.manifest import FileEntry, Manifest
from manifests.refs import Ref


def entry_target(entry: WeightsEntry, explicit: str | None = None) -> str:
    """The ref (``ns/model:tag``) or manifest digest (``b3:...``) to pull for ``entry``."""
    if explicit:
        return str(Digest.parse(explicit)) if explicit.startswith("b3:") else str(
            Ref.parse(explicit))
    return str(mirror_ref(entry))


def select_files(manifest: Manifest, allow: tuple[str, ...] = (),
                 ignore: tuple[str, ...] = ()) -> tuple[FileEntry, ...]:
    """The manifest's files that the patterns select (all of them with no patterns)."""
    if not allow and not ignore:
        return manifest.files
    chosen = set(select([f.path for f in manifest.files], allow, ignore))
    return tuple(f for f in manifest.files if f.path in chosen)
