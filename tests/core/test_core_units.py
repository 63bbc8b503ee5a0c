"""``bdn.units``: the one byte-size parser every flag and setting uses (binary units)."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bdn.errors import ConfigError
from bdn.units import MAX_BYTE_SIZE_BYTES, UNIT_BYTES, byte_size_arg, parse_byte_size
from tests.support.procs import bdn_command

ROOT = Path(__file__).resolve().parents[2]
SPELLINGS = {"k": ("k", "K", "KiB", "KB", "kib", "kb"), "m": ("M", "MiB", "MB", "m"),
             "g": ("G", "GiB", "GB", "gib"), "t": ("T", "TiB", "TB", "t")}


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("512M", 512 << 20), ("10GiB", 10 << 30), ("1.5G", 3 << 29),
    ("300M", 300 << 20), ("1.5T", int(1.5 * (1 << 40))), ("2k", 2048), ("3 MB", 3 << 20),
    ("0", 0), (" 10M\n", 10 << 20), ("7B", 7), ("1KB", 1024), (".5K", 512),
    ("1.1M", 1153433)])
def test_units_parse(text: str, value: int) -> None:
    assert parse_byte_size(text) == value
    assert byte_size_arg(text) == value


@pytest.mark.parametrize("text", ["", " ", "-1", "ten", "5X", "1e9", "nan", "inf", "1.",
                                  "1 0M", "10MiBs", "5iB", "0x10", "1,5G", "G"])
def test_units_refuse_junk_naming_the_flag(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_byte_size(text, name="--budget-bytes")
    assert str(info.value).startswith("--budget-bytes: not a byte size")
    assert info.value.field == "--budget-bytes"
    with pytest.raises(argparse.ArgumentTypeError):
        byte_size_arg(text)


def test_units_refuse_absurd_sizes() -> None:
    with pytest.raises(ConfigError, match="too large"):
        parse_byte_size("9" * 40 + "T", name="--budget-bytes")
    assert parse_byte_size(str(MAX_BYTE_SIZE_BYTES)) == MAX_BYTE_SIZE_BYTES


@given(st.integers(min_value=0, max_value=1 << 22), st.sampled_from(sorted(SPELLINGS)),
       st.data())
def test_units_every_spelling_of_a_unit_is_binary(n: int, unit: str,
                                                  data: st.DataObject) -> None:
    spelling = data.draw(st.sampled_from(SPELLINGS[unit]))
    space = data.draw(st.sampled_from(("", " ")))
    assert parse_byte_size(f"{n}{space}{spelling}") == n * UNIT_BYTES[unit]


@given(st.integers(min_value=0, max_value=1 << 62))
def test_units_plain_integers_are_bytes(n: int) -> None:
    assert parse_byte_size(str(n)) == n


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=999),
       st.sampled_from(("K", "M", "G")))
def test_units_fractions_are_exact_and_round_down(whole: int, frac: int, unit: str) -> None:
    text = f"{whole}.{frac:03d}{unit}"
    mult = UNIT_BYTES[unit.lower()]
    assert parse_byte_size(text) == (whole * 1000 + frac) * mult // 1000


@pytest.mark.slow  # runs the bdn CLI
def test_units_flags_of_agent_and_cache_use_the_one_parser(tmp_path: Path) -> None:
    # The CLI refuses junk in one sentence that names the flag (argparse's prefix).
    for argv in (["agent", "--budget-bytes", "lots"], ["agent", "--peer-upload-rate", "1e9"],
                 ["cache-server", "--dir", str(tmp_path), "--budget-bytes", "5X"]):
        out = subprocess.run(bdn_command(*argv), cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert f"argument {argv[-2]}: not a byte size" in out.stderr, out.stderr
    from bdn.cli import build_parser

    args = build_parser().parse_args(["agent", "--budget-bytes", "10GiB",
                                      "--max-bytes-in-flight", "512M",
                                      "--peer-upload-rate", "1.5G"])
    assert (args.budget_bytes, args.max_bytes_in_flight, args.peer_upload_rate) == (
        10 << 30, 512 << 20, 3 << 29)
