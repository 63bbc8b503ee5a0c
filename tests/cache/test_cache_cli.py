"""``bdn cache-server`` options: byte sizes, validation, and a clear refusal."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cache.cli import parse_bytes
from cache.server import CacheServerOptions
from tests.support.procs import ServiceProcess, bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("text", "value"), [
    ("1024", 1024), ("512M", 512 << 20), ("10GiB", 10 << 30), ("1.5T", int(1.5 * (1 << 40))),
    ("2k", 2048), ("3 MB", 3 << 20), ("0", 0)])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "-1", "ten", "5X", "1e9"])
def test_parse_bytes_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        CacheServerOptions(store_url="", cache_dir="/x", budget_bytes=1)
    with pytest.raises(ValueError):
        CacheServerOptions(store_url="/s", cache_dir="/x", budget_bytes=-1)
    with pytest.raises(ValueError):
        CacheServerOptions(store_url="/s", cache_dir="/x", budget_bytes=1,
                           prefetch_rate_bytes_per_s=0)


def test_a_second_server_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    args = ["cache-server", "--store", str(tmp_path / "store"), "--dir", str(tmp_path / "c"),
            "--budget-bytes", "1M", "--listen", "127.0.0.1:0"]
    with ServiceProcess(bdn_command(*args)):
        second = ServiceProcess(bdn_command(*args), ready_prefix=None)
        assert second.proc.wait(60) == 1
        second.stop()
        assert "in use by another process" in second.output
