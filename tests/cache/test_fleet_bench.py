"""``bench/fleet.py`` keeps the disk to one run: it refuses up front a run that does not
fit, and removes each run's folder (by the name it gave it) once its figures are taken.

The bench itself needs root and network namespaces and runs for minutes; these tests
run only its disk handling: the up-front check as a real process against a small tmpfs
(it must stop before writing anything there), and the removal of a run folder laid out
as a run leaves it (read-only mounts included), next to a folder it must not touch.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.tmpfs import mounted_tmpfs

ROOT = Path(__file__).resolve().parent.parent.parent
FLEET = ROOT / "bench" / "fleet.py"
MiB = 1024 * 1024


def _fleet_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_fleet", FLEET)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while made
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(os.geteuid() != 0, reason="bench/fleet.py runs as root only")
def test_a_run_that_does_not_fit_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", 32 * MiB) as small:
        work = small / "fleet"
        done = subprocess.run(
            [sys.executable, str(FLEET), "--workdir", str(work), "--agents", "1,4",
             "--model-mib", "256", "--no-faults"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "not enough free space" in done.stderr and str(work) in done.stderr
        assert "N = 4" in done.stderr
        assert list(work.iterdir()) == []  # no model, no store, no run folder


def test_a_run_folder_is_removed_with_its_read_only_mounts_and_nothing_else(
        tmp_path: Path) -> None:
    fleet_mod = _fleet_module()
    runs = tmp_path / "runs"
    other = runs / "not-this-run"
    other.mkdir(parents=True)
    (other / "keep").write_bytes(b"x")
    fleet = fleet_mod.Fleet(argparse.Namespace(), None, runs)
    run = runs / "n4-s"
    # As a run leaves it: pod caches, node caches with read-only files, read-only mounts.
    (run / "pod0" / "objects").mkdir(parents=True)
    (run / "pod0" / "objects" / "o").write_bytes(b"o")
    files = run / "node0" / "files"
    files.mkdir(parents=True)
    (files / "f").write_bytes(b"f")
    (files / "f").chmod(0o444)
    mount = run / "mnt" / "m0"
    mount.mkdir(parents=True)
    os.link(files / "f", mount / "f")
    mount.chmod(0o555)
    fleet.run_dir = run  # what Fleet.start records for the run it lays out
    fleet.discard_run()
    assert not run.exists()
    assert (other / "keep").read_bytes() == b"x"
    assert fleet.run_dir is None
    fleet.discard_run()  # nothing left to remove: a no-op


def test_what_one_run_needs_counts_every_node_cache_and_every_pod() -> None:
    fleet_mod = _fleet_module()
    model = 512 * MiB
    need = fleet_mod.run_bytes_needed(model, 32)
    assert need == 35 * model + fleet_mod.DISK_HEADROOM_BYTES
    assert fleet_mod.check_free_space(Path("/"), 1, "x") is None
    said = fleet_mod.check_free_space(Path("/"), 1 << 62, "one run of N = 32")
    assert said is not None and "one run of N = 32" in said and "GiB are free" in said
