"""``make demo``: the main job end to end on embedded defaults (``python -m demo``).

The demo sits above every package — it runs the mirror, the cluster cache, the node
agent, ``bdn serve`` and the control plane together — so it lives in its own top-level
folder, the one place that may import all of them (``bdn/`` itself knows nothing of nodes).
"""
