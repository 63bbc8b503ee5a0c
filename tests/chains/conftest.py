"""Chains tests reuse the control plane's fixtures: a real control server on loopback."""

from tests.control.conftest import server, start_server  # noqa: F401
