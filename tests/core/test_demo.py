"""The demo's work folder (``./.demo``, wherever ``bdn-demo`` is run): the demo replaces
only a folder it made itself, and leaves anything else in place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DEMO_TIMEOUT_S = 180


def mirror_only(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "demo", "--mirror-only"], cwd=cwd,
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)


def test_demo_refuses_a_dot_demo_folder_it_did_not_make(tmp_path: Path) -> None:
    mine = tmp_path / ".demo" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("not the demo's")
    out = mirror_only(tmp_path)
    assert out.returncode != 0
    assert str(tmp_path / ".demo") in out.stderr and "not made by the demo" in out.stderr
    assert mine.read_text() == "not the demo's"
    assert sorted(p.name for p in mine.parent.iterdir()) == ["notes.txt"]


def test_demo_replaces_its_own_folder_on_the_next_run(tmp_path: Path) -> None:
    first = mirror_only(tmp_path)
    assert first.returncode == 0, first.stderr
    leftover = tmp_path / ".demo" / "store" / "leftover"
    leftover.write_text("from the first run")
    second = mirror_only(tmp_path)
    assert second.returncode == 0, second.stderr
    assert not leftover.exists()
    assert "uploaded" in second.stdout and "reused 0" in second.stdout
