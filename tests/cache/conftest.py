"""Fixtures for the cluster cache tests: a blob store folder, real cache-server and
HTTP-store processes on free loopback ports (stopped by PID at teardown); the S3 and
GCS servers of tests/support/buckets.py, re-exported. Helpers that tests call directly
live in tests/support/cache.py and tests/support/http.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bdn.store import BlobStore
from tests.support.buckets import gcs_server, s3_server  # noqa: F401 (re-exported)
from tests.support.cache import STORE_HTTP, StartCache
from tests.support.procs import ServiceProcess, bdn_command


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(str(tmp_path / "store"))


@pytest.fixture
def procs() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture
def start_cache(procs: list[ServiceProcess], tmp_path: Path) -> StartCache:
    """Start ``bdn cache-server``; keyword args become ``--options``."""

    def start(store_url: str, cache_dir: str | Path | None = None,
              budget: int = 1 << 30, **opts: object) -> ServiceProcess:
        cache_dir = cache_dir or tmp_path / f"cache{len(procs)}"
        args = ["cache-server", "--store", store_url, "--dir", str(cache_dir),
                "--budget-bytes", str(budget), "--listen", "127.0.0.1:0"]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        p = ServiceProcess(bdn_command(*args))
        procs.append(p)
        return p

    return start


@pytest.fixture
def start_store_http(procs: list[ServiceProcess]) -> Callable[..., ServiceProcess]:
    """Serve a store folder over HTTP (see store_http.py)."""

    def start(root: str | Path, stall_after: int | None = None,
              gated: bool = False, rate: int | None = None) -> ServiceProcess:
        cmd = [sys.executable, STORE_HTTP, str(root), "--listen", "127.0.0.1:0"]
        if stall_after is not None:
            cmd += ["--stall-after", str(stall_after)]
        if rate is not None:
            cmd += ["--rate", str(rate)]
        if gated:
            cmd.append("--gated")
        p = ServiceProcess(cmd, env={"PYTHONPATH": os.getcwd()})
        procs.append(p)
        return p

    return start
