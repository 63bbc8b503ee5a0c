"""The cache tiers between the blob store and the GPU nodes.

The cluster cache (this package's ``server``, ``disk``, ``eviction``, ``fill`` and
``client`` modules) is a set of pods on a rendezvous-hash ring: read-through from the
blob store with one store read per object however many nodes ask at once, byte ranges
served with sendfile, and an LRU disk budget. The node agent reads through it with
:class:`cache.client.RingClient`. The node cache (``cache/node*``) lives beside it.
"""
