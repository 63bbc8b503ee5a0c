"""The agent's counters and ``/metrics`` families, named and described once.

The engine, its file jobs and the peer server count into one plain dict of counters
(``counters[name]`` → ``bdn_agent_<name>_total``; the ``bytes_<tier>`` counters are one
family, ``bdn_agent_delivered_bytes_total{tier}``); :func:`collect` turns it, the buffer
pool, the node cache's stats and the pulls' states into Prometheus families when
scraped. Plain counters (not ``prometheus_client`` objects) because tests run several
agents in one process and ``GET /v1/status`` reports the same numbers as JSON.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from agent.fetch import BufferPool
from agent.filejobs import ANSWER_COUNTERS
from agent.pulls import TIERS
from bdn import metrics as prom
from cache.node import NodeCache

# HELP of each agent counter.
COUNTER_HELP = {
    "chunks_fetched": "Chunks fetched over the network and verified.",
    "chunks_copied_locally": "Chunks copied from another file in the node cache.",
    "bad_reports": "Bad copies reported to the cache pod or peer that served them.",
    "chunk_retries": "Chunk fetches retried after a failed answer.",
    "chunks_failed": "Chunks that failed after every source and retry.",
    "integrity_failures": "Answers whose bytes did not match their digest.",
    "truncated_answers": "Answers that ended before the chunk's last byte.",
    "busy_answers": "Answers asking to come back later (429/503 with Retry-After).",
    "error_answers": "Transport failures and answers with another HTTP status.",
    "missing_answers": "Answers saying the source lacks the chunk (404/410).",
    "timeout_answers": "Sources that gave no connection, first byte or progress in time.",
    "uncached_answers": "Only-if-cached asks answered 504 (the pod lacked the chunk).",
    "pulls_started": "Pulls started.",
    "pulls_done": "Pulls that finished.",
    "pulls_failed": "Pulls that failed.",
    "peer_uploads": "Chunks served to peer agents.",
    "peer_upload_bytes": "Bytes served to peer agents.",
    "peer_busy_answers": "Peer requests refused as busy.",
    "peer_missing_answers": "Peer requests for chunks this node does not hold.",
    "peer_copies_dropped": "Held chunks dropped after a re-hash showed them bad.",
    "peer_receiving_waits": "Peer requests that waited for a chunk still being received.",
    "peer_uploads_after_wait": "Chunks served to peers after waiting for their receive.",
}
# Node cache stats (``NodeCache.stats()``) → metric name and HELP; units end the name.
NODE_CACHE_GAUGES = {
    "files": ("bdn_node_cache_files", "Complete files in the node cache."),
    "partial_files": ("bdn_node_cache_partial_files", "Files still being written."),
    "bytes_used": ("bdn_node_cache_used_bytes", "Bytes of files in the node cache."),
    "bytes_pinned": ("bdn_node_cache_pinned_bytes", "Bytes of files pinned by mounts."),
    "budget_bytes": ("bdn_node_cache_budget_bytes", "The node cache's byte budget."),
}


def new_counters() -> dict[str, int]:
    """The engine's counters, all zero (the peer server adds its own when it counts)."""
    return {
        **{f"bytes_{t}": 0 for t in TIERS}, "chunks_fetched": 0,
        "chunks_copied_locally": 0, "bad_reports": 0, "chunk_retries": 0,
        "chunks_failed": 0, **dict.fromkeys(ANSWER_COUNTERS.values(), 0),
        "pulls_started": 0, "pulls_done": 0, "pulls_failed": 0}


def collect(counters: Mapping[str, int], buffers: BufferPool, node: NodeCache,
            pull_states: Mapping[str, int]) -> Iterator[prom.Metric]:
    """The agent's families (``/metrics``), read from its live state."""
    yield prom.counter("bdn_agent_delivered_bytes_total",
                       "Bytes delivered to pulls, by the tier they came from.",
                       [({"tier": t}, counters.get(f"bytes_{t}", 0)) for t in TIERS])
    for name, value in sorted(counters.items()):
        if name.startswith("bytes_") and name[len("bytes_"):] in TIERS:
            continue
        yield prom.counter(f"bdn_agent_{name}_total",
                           COUNTER_HELP.get(name, f"Agent counter {name}."), value=value)
    yield prom.gauge("bdn_agent_buffer_pool_bytes",
                     "Bytes of fetch buffers allocated now.", value=buffers.total_bytes)
    yield prom.gauge("bdn_agent_buffer_pool_max_bytes",
                     "Most bytes of fetch buffers allowed.", value=buffers.max_bytes)
    for key, value in sorted(node.stats().items()):
        name, help_ = NODE_CACHE_GAUGES.get(key, (f"bdn_node_cache_{key}",
                                                  f"Node cache {key}."))
        yield prom.gauge(name, help_, value=value)
    yield prom.gauge("bdn_agent_pulls", "Pulls known to the agent, by state.",
                     [({"state": st}, n) for st, n in sorted(pull_states.items())])
