"""Errors of the node cache (``cache/node.py``); re-exported by ``agent.errors``."""

from __future__ import annotations

from manifests.errors import BdnError


class NodeCacheError(BdnError):
    """The node cache's files or index are unusable."""


class BudgetError(NodeCacheError):
    """The node cache's byte budget cannot hold what a pull needs (even after eviction)."""

    def __init__(self, message: str, *, needed: int = 0, available: int = 0,
                 budget: int = 0) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available
        self.budget = budget


class DiskFullError(NodeCacheError):
    """The node's disk refused space (ENOSPC / EDQUOT) for a file being pulled."""

    def __init__(self, message: str, *, path: str = "", needed: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.needed = needed
