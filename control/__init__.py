"""The control plane: models, deployments, environments, autoscaling and request routing.

One daemon (``bdn control-server``) serves two surfaces on one port: the management API
under ``/v1/`` (paths and JSON fields follow Baseten's management API, so existing
clients and habits carry over) and the inference router under ``/models/{model_id}/``.
Both share the in-memory view of every deployment's replicas, which is why they live in
one process: the router counts in-flight requests and the autoscaler reads exactly those
counts, with no metrics pipeline in between.

Layout, from the pure core outwards:

- ``settings``: autoscaling settings and their documented ranges (validated on construction).
- ``autoscaler``: the scaling policy, a pure function of settings, samples, state and ``now``.
- ``store``: durable state (SQLite): models, deployments, environments, settings.
- ``backends``: the declarative backend protocol ("deployment D should have n
  replicas", readiness reported back) and its local implementation (``bdn serve``
  processes; a Kubernetes stub that renders a Deployment).
- ``push`` / ``delivery``: a pushed folder becomes a code manifest plus pinned weights
  manifests in the blob store; a replica start has the node agent deliver them.
- ``controller``: the live state (replicas, in-flight counts, queues) and the scaling loop.
- ``router`` / ``api``: the HTTP surfaces; ``metrics``: Prometheus text.
- ``client`` / ``cli``: the ``bdn push / deployments / promote / predict / ...`` commands.
"""
