"""Control-plane fixtures (tests/support/control_fixtures.py): model folders and real
control servers on loopback."""

from tests.support.control_fixtures import (  # noqa: F401
    make_model,
    quick_server,
    server,
    start_server,
)
