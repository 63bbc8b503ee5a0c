"""The pull planner: what to do for every file and chunk of a pull, and in what order.

A pure function (:func:`plan_pull`) of the manifests' files, what the node already has
(complete files, verified chunks of partial files, chunk locations in any cached file)
and :class:`PlanOptions`. It does no I/O, so every decision — reuse, resume, local
copy, network fetch, order — is unit-tested without a disk or a network, and the
executor (``agent/engine.py``) only carries the plan out.

Decisions, per distinct file (by node cache key, ``cache.node.content_key``; a duplicate
file is written once and linked):

* complete in the node cache → nothing to fetch (``cached``);
* otherwise each chunk is ``done`` (journaled in this file's partial copy: resume),
  ``local`` (its bytes lie verified elsewhere on the node: ``copy_file_range``),
  ``network`` (first occurrence in this pull) or ``dup`` (an earlier chunk of this pull
  has the same digest: copied locally once that one is written — fetched once).

Order is the order a loader reads: small non-weight files first (``config.json``, the
tokenizer, the safetensors index: a loader opens these before any tensor), then weight
files by path (shard 1 before shard 2), and within a file by offset — the header chunk,
then tensors in file order. Issuing requests in that order with a bounded window makes
completions arrive in nearly that order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from cache.node import ChunkLocation, content_key
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5",
                   ".msgpack", ".onnx")
ChunkSource = Literal["done", "local", "network", "dup"]


@dataclass(frozen=True)
class PlanOptions:
    """``order``: ``loader`` (small files, then weights, by path) or ``path`` (by path)."""

    order: str = "loader"

    def __post_init__(self) -> None:
        if self.order not in ("loader", "path"):
            raise ValueError("PlanOptions.order must be 'loader' or 'path'")


@dataclass(frozen=True, slots=True)
class PullTarget:
    """One mount of a pull: where (``mount`` absolute path, or None: pre-warm) and what."""

    mount: str | None
    files: tuple[FileEntry, ...]


@dataclass(frozen=True, slots=True)
class ChunkTask:
    chunk: Chunk
    source: ChunkSource
    location: ChunkLocation | None = None  # for "local"


@dataclass(frozen=True, slots=True)
class FilePlan:
    """Work for one distinct file digest that is not complete on the node."""

    entry: FileEntry
    tasks: tuple[ChunkTask, ...]
    resumed: bool  # a partial copy with journaled chunks exists

    @property
    def digest(self) -> Digest:
        """The node cache key of the file (``cache.node.content_key``)."""
        return content_key(self.entry)


@dataclass(frozen=True, slots=True)
class Link:
    """A file to expose in a mount once its digest is complete."""

    mount: str
    path: str
    digest: Digest
    size: int


@dataclass(frozen=True)
class PullPlan:
    files: tuple[FilePlan, ...]          # to write, loader order
    cached: tuple[FileEntry, ...]        # complete already (one per digest)
    links: tuple[Link, ...]              # loader order
    sizes: Mapping[Digest, int]          # every distinct file of the pull → size

    def bytes_by_source(self) -> dict[str, int]:
        out = {"cached": sum(e.size for e in self.cached), "done": 0, "local": 0,
               "network": 0, "dup": 0}
        for f in self.files:
            for t in f.tasks:
                out[t.source] += t.chunk.length
        return out

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def network_chunks(self) -> list[tuple[FilePlan, Chunk]]:
        return [(f, t.chunk) for f in self.files for t in f.tasks if t.source == "network"]


def loader_key(path: str, options: PlanOptions) -> tuple[int, str]:
    if options.order == "path":
        return (0, path)
    weight = path.lower().endswith(WEIGHT_SUFFIXES)
    return (1 if weight else 0, path)


def plan_pull(targets: Sequence[PullTarget], *, have_files: frozenset[Digest] | set[Digest],
              chunk_locations: Mapping[Digest, ChunkLocation],
              journals: Mapping[Digest, Mapping[int, Digest]],
              options: PlanOptions = PlanOptions()) -> PullPlan:
    """Plan a pull (pure). See the module docstring for the rules."""
    ordered: list[tuple[tuple[int, str], int, str | None, FileEntry]] = []
    for ti, target in enumerate(targets):
        for entry in target.files:
            ordered.append((loader_key(entry.path, options), ti, target.mount, entry))
    ordered.sort(key=lambda x: (x[0], x[1]))

    links: list[Link] = []
    first_entry: dict[Digest, FileEntry] = {}
    for _, _, mount, entry in ordered:
        key = content_key(entry)
        first_entry.setdefault(key, entry)
        if mount is not None:
            links.append(Link(mount, entry.path, key, entry.size))

    cached: list[FileEntry] = []
    plans: list[FilePlan] = []
    seen_chunks: set[Digest] = set()
    for digest, entry in first_entry.items():
        if digest in have_files:
            cached.append(entry)
            continue
        journal = journals.get(digest, {})
        tasks: list[ChunkTask] = []
        for c in entry.chunks:
            if journal.get(c.offset) == c.digest:
                tasks.append(ChunkTask(c, "done"))
                seen_chunks.add(c.digest)
                continue
            loc = chunk_locations.get(c.digest)
            # A location inside this very file's partial copy is only valid at its own
            # offset (handled as "done" above); anywhere else it is a real source.
            if loc is not None and not (loc.partial and loc.file_hex == digest.hex):
                tasks.append(ChunkTask(c, "local", loc))
            elif c.digest in seen_chunks:
                tasks.append(ChunkTask(c, "dup"))
            else:
                tasks.append(ChunkTask(c, "network"))
            seen_chunks.add(c.digest)
        plans.append(FilePlan(entry, tuple(tasks), resumed=bool(journal)))
    return PullPlan(files=tuple(plans), cached=tuple(cached), links=tuple(links),
                    sizes={d: e.size for d, e in first_entry.items()})
