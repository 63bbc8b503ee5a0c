"""``bdn mirror`` + ``bdn export`` deliver what ``snapshot_download`` delivers.

A differential test on the Hub stand-in (``tests/mirror/fixtures_hf.py``, which answers
the routes the installed ``huggingface_hub`` calls, the recursive tree listing included):
the same repository, revision and patterns are downloaded with
``huggingface_hub.snapshot_download`` and with the ``bdn`` CLI (mirror into a store,
export to a folder), and the two folders must hold the same files with the same bytes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location(
    "bdn_test_fixtures_hf", Path(__file__).parents[1] / "mirror" / "fixtures_hf.py")
assert _spec is not None and _spec.loader is not None
fixtures_hf = sys.modules.get("bdn_test_fixtures_hf") or importlib.util.module_from_spec(_spec)
if "bdn_test_fixtures_hf" not in sys.modules:
    sys.modules["bdn_test_fixtures_hf"] = fixtures_hf
    _spec.loader.exec_module(fixtures_hf)

REPO = "org/nested"
# Loopback only: no token, no Xet, no telemetry, whatever this machine has configured.
HF_ENV = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}

FILES = {
    "config.json": b'{"architectures": ["X"]}',
    "generation_config.json": b"{}",
    "model.safetensors": bytes(range(256)) * 300,  # LFS (large, and by suffix)
    "README.md": b"# nested\n",
    ".gitattributes": b"*.safetensors filter=lfs\n",
    "sub/config.json": b'{"sub": true}',
    "sub/deeper/weights.bin": b"\x01" * 20_000,
    "sub/deeper/notes.txt": b"notes",
    "original/params.json": b'{"dim": 8}',
    "original/consolidated.00.pth": b"\x02" * 15_000,
    "1_Pooling/config.json": b'{"pooling": "mean"}',
}

SELECTIONS: list[tuple[list[str] | None, list[str] | None]] = [
    (None, None),
    (["*.json"], None),
    (None, ["*.json"]),
    (["**/*.json"], None),
    (["*.safetensors", "sub/"], ["*.txt"]),
    (["*"], ["original/*", ".*", "*.md"]),
    (["sub/*/*"], None),
    (["[!s]*"], ["*.bin"]),
    (["*config.json"], ["1_Pooling/*"]),
]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Any]:
    fixture = fixtures_hf.HubFixture(tmp_path / "hub-blobs").start()
    try:
        fixture.state.commit(REPO, FILES)
        fixture.state.tree_page_size = 4  # the listing is paged, as the Hub pages it
        yield fixture
    finally:
        fixture.stop()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("allow", "ignore"), SELECTIONS)
def test_mirror_and_export_match_snapshot_download(hub: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   allow: list[str] | None,
                                                   ignore: list[str] | None) -> None:
    from huggingface_hub import snapshot_download

    for k, v in HF_ENV.items():
        monkeypatch.setenv(k, v)
    snap = Path(snapshot_download(REPO, revision="main", endpoint=hub.url, token=False,
                                  cache_dir=tmp_path / "hf-cache", allow_patterns=allow,
                                  ignore_patterns=ignore))
    expected = _files(snap)
    assert expected, "the selection is not empty"

    store = tmp_path / "store"
    mirror = [*bdn_command("mirror", f"hf://{REPO}@main", "--ref", "team/nested:v1",
                           "--endpoint-url", hub.url, "--store", str(store))]
    for a in allow or ():
        mirror += ["--allow", a]
    for g in ignore or ():
        mirror += ["--ignore", g]
    # A fresh HOME: no token or config of this machine's reaches the fixture.
    env = {**HF_ENV, "PATH": os.environ["PATH"], "HOME": str(tmp_path),
           **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}
    done = subprocess.run(mirror, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    dest = tmp_path / "export"
    done = subprocess.run(bdn_command("export", "team/nested:v1", str(dest), "--store",
                                      str(store)), env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _files(dest) == expected, (allow, ignore)
