"""Fixtures of the agent's tests live in ``agent_support.py`` (importable by tests too)."""

from tests.agent.agent_support import agents, base, cache_server, store, tuned  # noqa: F401
