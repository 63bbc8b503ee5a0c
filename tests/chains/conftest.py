"""Chains tests reuse the control plane's fixtures: a real control server on loopback."""

from tests.support.control_fixtures import server, start_server  # noqa: F401
