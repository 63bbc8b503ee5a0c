"""``bdn serve-delivered`` (a replica pod's entrypoint) refuses bad input before it
touches the node agent, naming the argument; its delivery, serving and release of pulls
are shown end to end in test_kube_e2e.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.procs import bdn_command

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("weights", "says"), [
    ("{not json", "--weights: is not valid JSON at offset 1"),
    ('{"ref": "b3:00"}', "--weights: must be a JSON list"),
    ('[{"mount_location": "/w"}]', "--weights[0]: must be an object with a pinned ref"),
    ('[{"ref": "b3:00", "mount_location": "/w"}, 3]', "--weights[1]: must be an object"),
])
def test_bad_weights_are_refused_naming_the_argument(tmp_path: Path, weights: str,
                                                     says: str) -> None:
    # The socket does not exist: a wrong answer could not reach any agent.
    done = subprocess.run(bdn_command(
        "serve-delivered", "--agent-socket", str(tmp_path / "no.sock"), "--mounts-root",
        str(tmp_path), "--deployment", "d1", "--code", "b3:" + "0" * 64,
        "--weights", weights, "--listen", "127.0.0.1:0"),
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert says in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_agent_is_reported(tmp_path: Path) -> None:
    done = subprocess.run(bdn_command(
        "serve-delivered", "--agent-socket", str(tmp_path / "no.sock"), "--mounts-root",
        str(tmp_path), "--deployment", "d1", "--code", "b3:" + "0" * 64,
        "--listen", "127.0.0.1:0"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "could not deliver deployment d1" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
