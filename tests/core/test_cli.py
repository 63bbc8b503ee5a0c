"""The ``bdn`` CLI as a user meets it: help, version, -v/-q anywhere, progress and
units, JSON output and JSON errors, and one clear line for a store that refuses.

Every test runs the real CLI in a subprocess, as a shell or a script would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from bdn.cli import build_parser
from tests.support.models import write_model_dir
from tests.support.procs import bdn_command, free_port

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

# A size in the binary units every summary and bar uses.
BINARY_SIZE = re.compile(r"\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)\b")
DECIMAL_UNIT = re.compile(r"\d (kB|MB|GB|TB)\b")


def bdn(*args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(bdn_command(*args), capture_output=True, text=True, timeout=120,
                          check=False, env=env, cwd=cwd)


def aws_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment where boto finds no credentials of the machine it runs on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_MAX_ATTEMPTS="1",
               AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"), **extra)
    return env


@pytest.fixture
def mirrored(tmp_path: Path) -> Path:
    """A store holding one small model under ``t/m:v1``; returns the store folder."""
    write_model_dir(tmp_path / "model")
    store = tmp_path / "store"
    out = bdn("mirror", str(tmp_path / "model"), "--ref", "t/m:v1", "--store", str(store),
              "--json")
    assert out.returncode == 0, out.stderr
    return store


def test_autoscaling_set_help_prints_the_percent_unit() -> None:
    out = bdn("autoscaling", "set", "--help")
    assert out.returncode == 0, out.stderr
    assert "--target-utilization-percentage" in out.stdout and "%" in out.stdout


def test_every_command_formats_its_help() -> None:
    # In-process over the whole tree: a help string with a stray % fails here first.
    parser = build_parser()
    pending = [parser]
    seen = 0
    while pending:
        p = pending.pop()
        assert p.format_help()
        seen += 1
        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                pending.extend(action.choices.values())
    assert seen > 10


def test_version() -> None:
    out = bdn("--version")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"bdn \S+\n", out.stdout)


def test_verbose_and_quiet_are_accepted_after_the_command(mirrored: Path) -> None:
    for flags in (["-v"], ["-vv"], ["-q"], ["--quiet", "--verbose"]):
        before = bdn(*flags, "store", "refs", "--store", str(mirrored))
        after = bdn("store", "refs", "--store", str(mirrored), *flags)
        assert after.returncode == 0, (flags, after.stderr)
        assert after.stdout == before.stdout
    debug = bdn("store", "refs", "--store", str(mirrored), "-vv")
    assert debug.returncode == 0 and "unrecognized" not in debug.stderr


def test_quiet_turns_off_progress_and_bars_use_binary_units(tmp_path: Path,
                                                            mirrored: Path) -> None:
    # FORCE_COLOR makes rich treat the captured stderr as a terminal, so bars are drawn.
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "200"}
    loud = bdn("export", "t/m:v1", str(tmp_path / "a"), "--store", str(mirrored), env=env)
    assert loud.returncode == 0, loud.stderr
    assert "export" in loud.stderr and "━" in loud.stderr, "a bar is drawn on a terminal"
    assert "iB" in loud.stderr and not DECIMAL_UNIT.search(loud.stderr)
    for argv in (["-q", "export", "t/m:v1", str(tmp_path / "b")],
                 ["export", "t/m:v1", str(tmp_path / "c"), "--quiet"]):
        quiet = bdn(*argv, "--store", str(mirrored), env=env)
        assert quiet.returncode == 0, quiet.stderr
        assert quiet.stderr == "", "no bar with --quiet"
        assert "exported" in quiet.stdout, "the summary is a result, not progress"


def test_summaries_use_binary_units(tmp_path: Path) -> None:
    write_model_dir(tmp_path / "model")
    store = str(tmp_path / "store")
    out = bdn("mirror", str(tmp_path / "model"), "--ref", "t/m:v1", "--store", store)
    assert out.returncode == 0, out.stderr
    assert re.search(r"\d\.\d\d (B|KiB|MiB|GiB|TiB)/s$", out.stdout, re.MULTILINE), out.stdout
    assert not DECIMAL_UNIT.search(out.stdout) and "GB/s" not in out.stdout
    stats = bdn("store", "stats", "--store", store)
    assert BINARY_SIZE.search(stats.stdout) and not DECIMAL_UNIT.search(stats.stdout)


def test_store_refs_json(mirrored: Path) -> None:
    out = bdn("store", "refs", "--json", "--store", str(mirrored))
    assert out.returncode == 0, out.stderr
    (entry,) = json.loads(out.stdout)
    assert entry["ref"] == "t/m:v1" and entry["digest"].startswith("b3:")


def test_json_errors_are_json_on_stderr(tmp_path: Path, mirrored: Path) -> None:
    out = bdn("manifest", "show", "t/missing:v1", "--json", "--store", str(mirrored))
    assert out.returncode != 0 and out.stdout == ""
    doc = json.loads(out.stderr)
    assert "t/missing:v1" in doc["error"] and doc["type"]
    usage = bdn("store", "refs", "--json", "--no-such-flag")
    assert usage.returncode == 2 and usage.stdout == ""
    assert "--no-such-flag" in json.loads(usage.stderr)["error"]
    without = bdn("manifest", "show", "t/missing:v1", "--store", str(mirrored))
    assert without.returncode != 0 and without.stderr.startswith("bdn: error: ")


def test_s3_store_without_credentials_is_one_line(tmp_path: Path) -> None:
    out = bdn("store", "stats", "--store", "s3://bdn-no-such-bucket", env=aws_env(tmp_path))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("bdn: error: store s3://bdn-no-such-bucket")
    assert "credentials" in line and "AWS chain" in line and "--store-secret" in line


def test_unreachable_s3_endpoint_is_one_json_error(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = aws_env(tmp_path, AWS_ACCESS_KEY_ID="bdn-test-key-id",
                  AWS_SECRET_ACCESS_KEY="bdn-test-secret-value")
    out = bdn("store", "refs", "--json", "--store", "s3://bdn-bucket", "--store-endpoint-url",
              endpoint, env=env)
    assert out.returncode == 1 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    doc = json.loads(line)
    assert doc["type"] == "StoreError" and doc["url"] == "s3://bdn-bucket"
    assert endpoint in doc["error"] and "AWS_ACCESS_KEY_ID" in doc["error"]
    assert "bdn-test-secret-value" not in out.stderr


def test_bare_owner_repo_suggests_hf(tmp_path: Path) -> None:
    out = bdn("mirror", "acme/llama", "--ref", "t/m:v1", "--store", str(tmp_path / "store"),
              cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "hf://acme/llama" in out.stderr
    assert not (tmp_path / "store").exists(), "nothing written for a misspelt source"


# Each service, and `bdn mirror`, with what it needs besides the store flags.
STORE_FLAG_COMMANDS = [
    ["mirror", "model", "--ref", "t/m:v1"],
    ["mirror-server", "--keys", "keys.yaml"],
    ["cache-server", "--dir", "cache", "--budget-bytes", "1G"],
    ["agent"],
    ["pull", "t/m:v1"],
]


@pytest.mark.parametrize("argv", STORE_FLAG_COMMANDS, ids=lambda a: a[0])
def test_every_service_parses_the_store_flags_of_mirror(argv: list[str]) -> None:
    args = build_parser().parse_args([
        *argv, "--store", "s3://bucket/store", "--store-endpoint-url", "http://s3.local:9000",
        "--store-secret", "s3creds", "--secrets-dir", "/run/secrets"])
    assert (args.store, args.store_endpoint_url, args.store_secret, args.secrets_dir) == (
        "s3://bucket/store", "http://s3.local:9000", "s3creds", "/run/secrets")


def test_the_agent_opens_its_store_with_the_store_flags(tmp_path: Path) -> None:
    # The agent builds its store from the flags as `bdn mirror` does: the secret is
    # looked up where --secrets-dir says, and the store is reached at the endpoint given.
    (tmp_path / "secrets").mkdir()
    secret = ["--store-secret", "nosuch", "--secrets-dir", str(tmp_path / "secrets")]
    daemon = bdn("agent", "--socket", str(tmp_path / "agent.sock"), "--cache-dir",
                 str(tmp_path / "node"), "--store", "s3://bdn-bucket", *secret)
    assert daemon.returncode != 0
    assert f"secret 'nosuch' not found (looked for {tmp_path}/secrets/nosuch" in daemon.stderr
    endpoint = f"http://127.0.0.1:{free_port()}"
    pull = bdn("pull", "t/m:v1", "--standalone", "--json", "--cache-dir",
               str(tmp_path / "node"), "--store", "s3://bdn-bucket",
               "--store-endpoint-url", endpoint,
               env=aws_env(tmp_path, AWS_ACCESS_KEY_ID="AKIABDNTEST", AWS_SECRET_ACCESS_KEY="x",
                           AWS_DEFAULT_REGION="us-east-1"))
    assert pull.returncode != 0
    error = json.loads(pull.stderr.strip().splitlines()[-1])
    assert f"{endpoint}/bdn-bucket/refs/t/m/v1" in error["error"], pull.stderr
