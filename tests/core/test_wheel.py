"""The demo runs from an installed wheel, without the repository.

A wheel is built from a copy of the source tree (pip builds in the tree it is given, and
a test writes only under its tmp_path), installed with ``--no-deps --no-index`` into a
fresh virtual environment, and run from an empty folder, so none of the repository's
folders can be imported. The dependencies come from this interpreter's site-packages,
named by a ``.pth`` file in the new environment: a ``.pth`` path is searched after the
environment's own site-packages, so the wheel's packages come first, and the editable
install of bdn there (its own ``.pth`` finder) is not loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_FILES = ("demo/minilm/config.yaml", "demo/minilm/model/model.py")
DEMO_MODULES = ("demo/__init__.py", "demo/__main__.py", "demo/coldstart.py",
                "demo/example.py")
BUILD_TIMEOUT_S = 300
MIRROR_ONLY_TIMEOUT_S = 180
DEMO_TIMEOUT_S = 420
# After a timeout the demo gets this long to stop its services (SIGINT runs its finally).
STOP_GRACE_S = 60


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    scripts: Path
    site_packages: Path


def run(cmd: list[str], timeout_s: float, **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                         **kw)  # type: ignore[call-overload]
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout}{out.stderr}"
    return out


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH, which names the repository under test."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".*", "__pycache__", "build", "dist", "*.egg-info"))
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "-w", str(dist), str(src)], BUILD_TIMEOUT_S)
    [wheel] = dist.glob("bdn-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], BUILD_TIMEOUT_S)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)], BUILD_TIMEOUT_S)
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                     "['purelib'])"], 60, env=clean_env()).stdout.strip())
    (site / "bdn-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return Installed(wheel, python, venv / "bin", site)


def run_demo(cmd: list[str], cwd: Path, timeout_s: float) -> str:
    """The demo's output; on a timeout it is interrupted so it stops its services."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=STOP_GRACE_S)
        finally:
            proc.kill()
            proc.wait()
        pytest.fail(f"{cmd} did not finish within {timeout_s} s:\n{out}")
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{out}"
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def test_wheel_ships_the_demo_its_example_folder_and_the_license(
        installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as zf:
        names = set(zf.namelist())
        for name in (*DEMO_MODULES, *EXAMPLE_FILES):
            assert name in names, f"{name} is not in {installed.wheel.name}"
            assert zf.read(name) == (ROOT / name).read_bytes(), name
        licenses = [n for n in names if ".dist-info/" in n and n.endswith("/LICENSE")]
        assert licenses, f"no LICENSE in {sorted(n for n in names if 'dist-info' in n)}"
        assert zf.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    assert "bdn-demo = demo.__main__:main" in scripts
    assert (installed.scripts / "bdn-demo").is_file()


def test_the_installed_demo_is_imported_from_the_wheel_not_the_repository(
        installed: Installed, tmp_path: Path) -> None:
    code = ("import json, bdn, demo, demo.example\n"
            "print(json.dumps([bdn.__file__, demo.__file__, demo.example.origin()]))\n")
    out = run([str(installed.python), "-c", code], 60, cwd=tmp_path, env=clean_env())
    for path in json.loads(out.stdout):
        assert Path(path).is_relative_to(installed.site_packages), path


def test_demo_mirror_only_reads_the_example_folder_from_the_installed_package(
        installed: Installed, tmp_path: Path) -> None:
    out = run_demo([str(installed.python), "-m", "demo", "--mirror-only"], tmp_path,
                   MIRROR_ONLY_TIMEOUT_S)
    assert f"from the package at {installed.site_packages / 'demo' / 'minilm'}" in out, out
    assert "mirror a fine-tune" in out and "no services started" in out, out
    for name in EXAMPLE_FILES:
        copied = tmp_path / ".demo" / Path(name).relative_to("demo")
        assert copied.read_bytes() == (installed.site_packages / name).read_bytes()


@pytest.mark.timeout(DEMO_TIMEOUT_S + STOP_GRACE_S + BUILD_TIMEOUT_S)
def test_bdn_demo_runs_end_to_end_from_the_wheel(installed: Installed,
                                                 tmp_path: Path) -> None:
    package = installed.site_packages / "demo"
    before = snapshot(package)
    out = run_demo([str(installed.scripts / "bdn-demo")], tmp_path, DEMO_TIMEOUT_S)
    assert f"from the package at {installed.site_packages / 'demo' / 'minilm'}" in out, out
    assert "first prediction in" in out and "ranking: [0, 1]" in out, out
    assert "all services stopped" in out, out
    assert "status SCALED_TO_ZERO" in out, out
    # Serving the example writes bytecode next to its model.py: into the demo's copy,
    # never into the installed package.
    assert snapshot(package) == before
