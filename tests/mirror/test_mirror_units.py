"""Secrets, the re-mirror key, and the ranged spooler (resume after a crash, verify)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bdn.config import parse_weights
from bdn.errors import AuthError, SourceError
from bdn.mirror_key import mirror_key, mirror_ref
from bdn.mirror_service import STALE_SPOOL_S, sweep_spool
from bdn.retry import RetryPolicy
from bdn.secrets import (
    ScrubFilter,
    SecretResolver,
    env_name,
    gcs_service_account,
    hf_token,
    s3_credentials,
    scrub,
    store_storage_options,
)
from bdn.transfer.files import Checksum, FetchCounters, SourceFile
from bdn.transfer.options import DownloadOptions
from bdn.transfer.spool import SPOOL_PREFIX, spool_file, spool_paths

# -- secrets -----------------------------------------------------------------------------


def test_mirror_secret_lookup_folder_then_env(tmp_path: Path) -> None:
    (tmp_path / "hf").write_text("  hf_FromFolder123456 \n")
    env = {"BDN_SECRET_HF": "hf_FromEnv", "BDN_SECRET_MY_S3_CREDS": "{}"}
    r = SecretResolver(str(tmp_path), env)
    assert hf_token(r.get("hf")) == "hf_FromFolder123456"
    assert env_name("my-s3.creds") == "BDN_SECRET_MY_S3_CREDS"
    assert r.get("my-s3.creds").reveal() == "{}"
    assert "hf_FromFolder" not in repr(r.get("hf")) and "hf_FromFolder" not in str(r.get("hf"))
    with pytest.raises(AuthError, match=r"secret 'nope' not found .*BDN_SECRET_NOPE"):
        r.get("nope")
    with pytest.raises(AuthError, match="not valid"):
        r.get("../etc/passwd")


def test_mirror_secret_formats_errors_never_echo_values() -> None:
    r = SecretResolver(None, {
        "BDN_SECRET_S3": json.dumps({"aws_access_key_id": "AKIAEXAMPLEKEY",
                                     "aws_secret_access_key": "SuperSecretValue123",
                                     "aws_region": "eu-west-1"}),
        "BDN_SECRET_BAD": json.dumps({"aws_access_key_id": "AKIAONLY",
                                      "password": "HiddenPassword42"}),
        "BDN_SECRET_NOTJSON": "HiddenPlainText99",
        "BDN_SECRET_GCS": json.dumps({"type": "service_account", "client_email": "a@b",
                                      "private_key": "-----KEY-----"}),
    })
    creds = s3_credentials(r.get("s3"))
    assert creds.aws_region == "eu-west-1" and "SuperSecretValue123" not in repr(creds)
    with pytest.raises(AuthError) as info:
        s3_credentials(r.get("bad"))
    assert "missing aws_secret_access_key" in str(info.value)
    assert "HiddenPassword42" not in str(info.value)
    with pytest.raises(AuthError) as info:
        s3_credentials(r.get("notjson"))
    assert "HiddenPlainText99" not in str(info.value)
    assert gcs_service_account(r.get("gcs"))["client_email"] == "a@b"
    with pytest.raises(AuthError, match="not a GCS service-account key"):
        gcs_service_account(r.get("s3"))
    opts = store_storage_options("s3://bucket/root", endpoint_url="http://127.0.0.1:1",
                                 secret=r.get("s3"))
    assert opts is not None and opts["key"] == "AKIAEXAMPLEKEY"
    assert opts["client_kwargs"] == {"region_name": "eu-west-1"}


def test_mirror_scrub_removes_revealed_values_from_text_and_logs(
        caplog: pytest.LogCaptureFixture) -> None:
    r = SecretResolver(None, {"BDN_SECRET_T": "hf_ScrubMe0123456789"})
    r.get("t")
    assert scrub("GET /x?token=hf_ScrubMe0123456789 failed") == "GET /x?token=*** failed"
    logger = logging.getLogger("bdn.test.scrub")
    caplog.handler.addFilter(ScrubFilter())
    with caplog.at_level(logging.INFO, logger="bdn.test.scrub"):
        logger.info("header was %s", "Bearer hf_ScrubMe0123456789")
    assert "hf_ScrubMe" not in caplog.text and "Bearer ***" in caplog.text


# -- mirror key --------------------------------------------------------------------------


def _entry(**kw: object) -> object:
    return parse_weights([{"source": "hf://org/m@main", "mount_location": "/m", **kw}])[0]


def test_mirror_key_is_stable_and_sensitive_to_what_is_mirrored() -> None:
    base = _entry(allow_patterns=["*.json", "*.safetensors"])
    same = _entry(allow_patterns=["*.safetensors", "*.json"])
    moved = parse_weights([{"source": "hf://org/m@main", "mount_location": "/elsewhere",
                            "allow_patterns": ["*.json", "*.safetensors"]}])[0]
    assert mirror_key(base) == mirror_key(same) == mirror_key(moved)  # type: ignore[arg-type]
    assert len(mirror_key(base)) == 16  # type: ignore[arg-type]
    others = [_entry(), _entry(allow_patterns=["*.json"]), _entry(ignore_patterns=["*.bin"]),
              _entry(auth_secret_name="hf"),
              parse_weights([{"source": "hf://org/m@v2", "mount_location": "/m"}])[0]]
    keys = {mirror_key(e) for e in [base, *others]}  # type: ignore[arg-type]
    assert len(keys) == 6
    ref = mirror_ref(base)  # type: ignore[arg-type]
    assert str(ref) == f"mirrors/{mirror_key(base)}:latest"  # type: ignore[arg-type]
    # Pinned value: changing the key derivation silently would orphan every mirror.
    assert mirror_key(_entry()) == "7e549b2efd09aa18"  # type: ignore[arg-type]


# -- ranged spooler ----------------------------------------------------------------------


class _Crash(Exception):
    pass


def test_mirror_spool_resumes_finished_parts_after_a_crash(tmp_path: Path) -> None:
    data = bytes(i % 251 for i in range(1_000_000))
    file = SourceFile("w.bin", len(data), "test:w")
    opts = DownloadOptions(part_bytes=128 * 1024, concurrency=1,
                           retry=RetryPolicy(attempts=2, base_delay_s=0.0, max_delay_s=0.0))
    checksum = Checksum("sha256", hashlib.sha256(data).hexdigest(), hashlib.sha256)
    requested: list[tuple[int, int]] = []

    def crashing(start: int, end: int) -> Iterator[bytes]:
        requested.append((start, end))
        if start >= 3 * 128 * 1024:
            raise _Crash("process killed")
        yield data[start:end]

    counters = FetchCounters()
    with pytest.raises(_Crash):
        spool_file(source_uri="t://x", file=file, spool_dir=tmp_path, fetch=crashing,
                   options=opts, counters=counters, counter_lock=threading.Lock(),
                   checksum=checksum)
    _part, state = spool_paths(tmp_path, "t://x", file)
    assert json.loads(state.read_text())["done"] == [0, 1, 2]
    requested.clear()

    def healthy(start: int, end: int) -> Iterator[bytes]:
        requested.append((start, end))
        mid = (start + end) // 2
        yield data[start:mid]
        yield data[mid:end]

    counters = FetchCounters()
    path = spool_file(source_uri="t://x", file=file, spool_dir=tmp_path, fetch=healthy,
                      options=opts, counters=counters, counter_lock=threading.Lock(),
                      checksum=checksum)
    assert path.read_bytes() == data
    assert min(s for s, _ in requested) == 3 * 128 * 1024  # finished parts not refetched
    assert counters.bytes_from_origin == len(data) - 3 * 128 * 1024


def test_mirror_spool_rejects_bytes_that_fail_the_checksum(tmp_path: Path) -> None:
    data = b"a" * 300_000
    file = SourceFile("w.bin", len(data), "test:w2")
    opts = DownloadOptions(part_bytes=64 * 1024, concurrency=3)
    bad = Checksum("sha256", hashlib.sha256(b"other").hexdigest(), hashlib.sha256)
    with pytest.raises(SourceError, match=r"w\.bin from t://y: downloaded bytes do not match"):
        spool_file(source_uri="t://y", file=file, spool_dir=tmp_path,
                   fetch=lambda s, e: iter([data[s:e]]), options=opts,
                   counters=FetchCounters(), counter_lock=threading.Lock(), checksum=bad)
    assert not list(tmp_path.glob("bdn-spool-*"))


def test_mirror_spool_short_reads_are_retried(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    file = SourceFile("s.bin", len(data), None)
    calls = {"n": 0}

    def short_once(start: int, end: int) -> Iterator[bytes]:
        calls["n"] += 1
        if calls["n"] == 1:
            yield data[start:start + 10]  # then the stream just ends
            return
        yield data[start:end]

    path = spool_file(source_uri="t://z", file=file, spool_dir=tmp_path, fetch=short_once,
                      options=DownloadOptions(part_bytes=1 << 20, concurrency=1,
                                              retry=RetryPolicy(attempts=3, base_delay_s=0)),
                      counters=FetchCounters(), counter_lock=threading.Lock())
    assert path.read_bytes() == data and calls["n"] == 2


def test_spool_sweep_takes_stale_spool_files_and_their_temporaries(tmp_path: Path) -> None:
    now = 1_000_000_000.0
    old = now - STALE_SPOOL_S - 1
    stale = [tmp_path / f"{SPOOL_PREFIX}abc", tmp_path / f"{SPOOL_PREFIX}abc.state",
             tmp_path / f".{SPOOL_PREFIX}abc.state.bdn-tmp-123-beef"]
    kept = [tmp_path / f"{SPOOL_PREFIX}fresh", tmp_path / "other-file",
            tmp_path / ".other.bdn-tmp-1-ab"]
    for p in stale + kept:
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    os.utime(kept[0], (now, now))
    assert sweep_spool(tmp_path, now=now) == len(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)
