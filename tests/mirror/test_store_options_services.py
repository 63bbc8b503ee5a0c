"""``cache-server`` and ``agent`` accept the same store options as ``mirror``
(``--store-endpoint-url``, ``--store-secret``, ``--secrets-dir``) and build the store
with the same function: a model mirrored into an S3 store (moto on loopback) is served
by a cache server and pulled by an agent that reach the store only through those flags.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentClient
from tests.support.http import http_get
from tests.support.models import write_model_dir
from tests.support.procs import ServiceProcess, bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow


def test_cache_server_and_agent_take_mirrors_store_flags(
        tmp_path: Path, s3_server: Any, secrets_dir: Path) -> None:
    bucket = s3_server.bucket("opts")
    store = f"s3://{bucket}/store"
    flags = ["--store", store, "--store-endpoint-url", s3_server.url,
             "--store-secret", "s3creds", "--secrets-dir", str(secrets_dir)]
    src = tmp_path / "model"
    write_model_dir(src, layers=1, hidden=64)
    done = subprocess.run(bdn_command("mirror", str(src), "--ref", "t/m:v1", "--json",
                                      *flags), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cache = ServiceProcess(bdn_command("cache-server", "--dir", str(tmp_path / "cache"),
                                       "--budget-bytes", "1G", "--listen", "127.0.0.1:0",
                                       *flags))
    agent = None
    try:
        status, _, body = http_get(f"{cache.url}/v1/refs/t/m/v1")
        assert status == 200 and b"b3:" in body
        sock = str(tmp_path / "agent.sock")
        agent = ServiceProcess(bdn_command("agent", "--cache-dir", str(tmp_path / "node"),
                                           "--budget-bytes", "1G", "--socket", sock,
                                           *flags))
        client = AgentClient(sock)
        st = client.wait(client.start_pull(ref="t/m:v1", mount=str(tmp_path / "m"))["id"])
        assert st["state"] == "done", st
        assert st["bytes_by_tier"]["store"] > 0
        for f in src.rglob("*"):
            if f.is_file():
                assert (tmp_path / "m" / f.relative_to(src)).read_bytes() == f.read_bytes()
        # The secret's values never reach the logs.
        secret = json.loads((secrets_dir / "s3creds").read_text())["aws_secret_access_key"]
        for proc in (cache, agent):
            assert secret not in proc.output
    finally:
        if agent is not None:
            agent.stop()
        cache.stop()
