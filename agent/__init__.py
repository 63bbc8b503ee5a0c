"""The node agent: turns ``weights:`` entries (or a manifest ref) into read-only files on
a GPU node, fetched in parallel through the cluster cache, verified chunk by chunk,
shared node-wide through the node cache (``cache/node.py``), resumable after a crash.

Modules: ``planner`` (pure pull plans), ``fetch`` (tiers: cache peers, blob store),
``fetchpolicy`` (pure: which source to ask next for a chunk, and when),
``writer`` (partial files, journal, publish), ``mounts`` (hardlink trees),
``mountkeeper`` (shared mounts: references, ledgers, per-mount locks), ``pulls`` (pull
records, idempotency, persistence), ``filejobs`` (one job per file, one fetch per chunk,
node-wide), ``events`` (the typed event records and their wire form), ``metrics``,
``engine`` (wires them and drives a pull), ``daemon`` (local HTTP API), ``client``,
``cli``.
"""
