"""``bdn -q`` silences the control commands' decoration on stderr (spinners, milestones)
and keeps their results on stdout; without it, a terminal gets both."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.control import API_KEY, ControlServer
from tests.support.procs import bdn_command

# A control server and CLI subprocesses: left out of `make test-fast`.
pytestmark = pytest.mark.slow


def test_quiet_push_prints_the_result_only(quick_server: ControlServer,
                                           make_model: Callable[..., Any]) -> None:
    # FORCE_COLOR makes rich treat the captured stderr as a terminal.
    env = {**os.environ, "BDN_CONTROL_URL": quick_server.url, "BDN_API_KEY": API_KEY,
           "FORCE_COLOR": "1"}

    def push(*flags: str) -> subprocess.CompletedProcess[str]:
        model = make_model("quiet")
        out = subprocess.run(bdn_command("push", str(model.path), *flags), env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["deployment_id"]
        return out

    assert "pushed" in push().stderr
    assert push("-q").stderr == ""
