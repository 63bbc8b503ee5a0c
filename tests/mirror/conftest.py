"""Fixtures for mirror tests: real protocol servers on loopback.

* S3 (moto) and GCS (fake-gcs-server): ``s3_server`` / ``gcs_server`` from
  tests/support/buckets.py (shared with tests/cache), re-exported here;
* Hugging Face Hub: our aiohttp fixture (``fixtures_hf.py``) in a background thread, one
  per test so counters and injected faults never leak between tests.

The environment is pinned so nothing talks to anything but loopback: explicit S3
credentials with the EC2 metadata service disabled, GCE metadata pointed at a dead
loopback port, anonymous tokens against the GCS emulator, and every Hub call aimed at the
fixture by explicit endpoint.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.buckets import (  # noqa: F401 (fixtures re-exported for pytest)
    S3_KEY_ID,
    S3_SECRET,
    SAFE_ENV,
    gcs_server,
    s3_server,
)

_spec = importlib.util.spec_from_file_location(
    "bdn_test_fixtures_hf", Path(__file__).with_name("fixtures_hf.py"))
assert _spec is not None and _spec.loader is not None
fixtures_hf = importlib.util.module_from_spec(_spec)
sys.modules["bdn_test_fixtures_hf"] = fixtures_hf
_spec.loader.exec_module(fixtures_hf)

@pytest.fixture(scope="session", autouse=True)
def _loopback_only_env() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    for k, v in SAFE_ENV.items():
        mp.setenv(k, v)
    mp.delenv("HF_TOKEN", raising=False)
    mp.delenv("AWS_SESSION_TOKEN", raising=False)
    mp.delenv("AWS_PROFILE", raising=False)
    mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    yield
    mp.undo()


# -- Hugging Face Hub ------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Any]:
    fixture = fixtures_hf.HubFixture(tmp_path / "hub-blobs").start()
    try:
        yield fixture
    finally:
        fixture.stop()


# -- helpers ---------------------------------------------------------------------------


def model_files(seed: int = 0, *, big: int = 600_000) -> dict[str, bytes]:
    """A small model-like tree: a safetensors file, JSON config, a nested binary."""
    import random

    rng = random.Random(seed)
    header = json.dumps({"w": {"dtype": "F32", "shape": [big // 4],
                               "data_offsets": [0, big // 4 * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    st = len(header).to_bytes(8, "little") + header + rng.randbytes(big // 4 * 4)
    return {"model.safetensors": st, "config.json": json.dumps({"seed": seed}).encode(),
            "sub/dir/tokenizer.bin": rng.randbytes(150_000), "empty.txt": b""}


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    d = tmp_path / "secrets"
    d.mkdir()
    (d / "s3creds").write_text(json.dumps({"aws_access_key_id": S3_KEY_ID,
                                           "aws_secret_access_key": S3_SECRET,
                                           "aws_region": "us-east-1"}))
    return d


@pytest.fixture
def make_files() -> Any:
    return model_files
