"""The loader against ``safetensors.torch.load_file``, for every dtype, shape and strategy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from manifests.errors import SafetensorsError
from serving.errors import WeightsFileError
from serving.loader import LoadOptions, iter_tensors, load, open_weights
from tests.serving.serving_helpers import (
    digest,
    every_dtype_entries,
    tensor_bytes,
    write_safetensors,
    write_sharded,
)

# Small buffers so that multi-part tensors and buffer reuse happen on small files.
SMALL = {"bounce_buffer_bytes": 64 << 10, "read_chunk_bytes": 64 << 10, "workers": 3}
CPU_STRATEGIES = ("mmap", "read", "direct", "bounce", "auto")


def reference(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(str(path))
    except SafetensorError:
        return None


def check_against(entries: dict, out: dict[str, torch.Tensor], refs: dict) -> None:
    assert set(out) == set(entries)
    for name, (_dtype, _shape, data) in entries.items():
        t = out[name]
        assert t.device.type == "cpu"
        assert tensor_bytes(t) == data, name
        ref = refs.get(name)
        if ref is not None:
            assert t.dtype == ref.dtype, name
            assert t.shape == ref.shape, name
        else:  # no torch dtype (F6) or a layout torch cannot express: raw bytes
            assert t.dtype == torch.uint8 and t.shape == (len(data),), name


def refs_of(folder: Path, entries: dict) -> dict[str, torch.Tensor]:
    """Reference tensors one file per entry, since load_file refuses F6 in a whole file."""
    refs = {}
    for i, (name, entry) in enumerate(entries.items()):
        p = folder / f"ref{i}.safetensors"
        write_safetensors(p, {name: entry})
        got = reference(p)
        if got is not None:
            refs[name] = got[name]
        p.unlink()
    return refs


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    folder = tmp_path_factory.mktemp("every")
    entries = every_dtype_entries(seed=1)
    refs = refs_of(folder, entries)
    # Most dtypes do have a torch counterpart that safetensors uses; make sure the
    # comparison really happened for them.
    assert {"f32.4x6", "bf16.2x3x4", "f8_e4m3.5", "c64.scalar", "u64.0", "f4.2x6"} <= set(refs)
    path = folder / "model.safetensors"
    write_safetensors(path, entries, shuffle=7)
    return path, entries, refs


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
def test_every_dtype_and_shape_equals_safetensors(every_dtype: tuple, strategy: str) -> None:
    path, entries, refs = every_dtype
    out = load(path, strategy=strategy, **SMALL)
    check_against(entries, out, refs)


def test_float_values_equal_reference_elementwise(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(33, 17), "h": torch.randn(5, dtype=torch.float16),
               "b": torch.randn(3, 3, dtype=torch.bfloat16), "i": torch.arange(-5, 5),
               "s": torch.tensor(2.5, dtype=torch.float64), "e": torch.empty(0, 3),
               "m": torch.tensor([True, False, True])}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for strategy in CPU_STRATEGIES:
        out = load(tmp_path, strategy=strategy, **SMALL)
        for k, v in tensors.items():
            assert out[k].dtype == v.dtype and out[k].shape == v.shape
            assert torch.equal(out[k], v), (strategy, k)


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
def test_sharded_with_index_equals_safetensors(tmp_path: Path, strategy: str) -> None:
    entries = every_dtype_entries(seed=2)
    refs = refs_of(tmp_path, entries)
    index = write_sharded(tmp_path, entries, shards=3)
    for source in (index, tmp_path):  # the index itself, or its folder
        out = load(source, strategy=strategy, **SMALL)
        check_against(entries, out, refs)


def test_explicit_files(tmp_path: Path) -> None:
    a = {"x": ("F32", (2,), b"\x00" * 8)}
    b = {"y": ("I64", (1,), b"\x07" + b"\x00" * 7)}
    write_safetensors(tmp_path / "a.safetensors", a)
    write_safetensors(tmp_path / "b.safetensors", b)
    out = load([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    assert out["y"].tolist() == [7] and out["x"].tolist() == [0.0, 0.0]


def test_iterator_yields_each_tensor_once(every_dtype: tuple) -> None:
    path, entries, _ = every_dtype
    names = [n for n, _ in iter_tensors(path, strategy="bounce", **SMALL)]
    assert sorted(names) == sorted(entries)


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
def test_buffer_safety_hash_at_yield_equals_hash_after_load(tmp_path: Path,
                                                           strategy: str) -> None:
    # Many tensors larger and smaller than the bounce buffers, so every buffer is
    # refilled many times while earlier tensors are held by the caller.
    gen = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(int(torch.randint(1, 40_000, (1,), generator=gen)),
                                    generator=gen) for i in range(60)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    at_yield: dict[str, str] = {}
    kept: dict[str, torch.Tensor] = {}
    for name, t in iter_tensors(tmp_path, strategy=strategy, bounce_buffer_bytes=16 << 10,
                                read_chunk_bytes=16 << 10, workers=2):
        at_yield[name] = digest(t)
        kept[name] = t
    assert set(kept) == set(tensors)
    for name, t in kept.items():
        assert digest(t) == at_yield[name], name
        assert torch.equal(t, tensors[name]), name


def test_unaligned_tensor_is_copied_aligned(tmp_path: Path) -> None:
    # A U8 tensor of 3 bytes first puts the F32 tensor after it at an odd offset.
    entries = {"a": ("U8", (3,), b"\x01\x02\x03"),
               "b": ("F32", (2,), torch.tensor([1.5, -2.0]).numpy().tobytes())}
    write_safetensors(tmp_path / "model.safetensors", entries)
    for strategy in CPU_STRATEGIES:
        out = load(tmp_path, strategy=strategy)
        assert out["b"].tolist() == [1.5, -2.0]
        assert out["b"].data_ptr() % 4 == 0


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
def test_file_of_only_empty_tensors_loads(tmp_path: Path, strategy: str) -> None:
    # No byte to read: direct reads have no buffer to tile, and must not need one.
    save_file({"e": torch.empty(0, 3), "z": torch.zeros(0)}, str(tmp_path / "m.safetensors"))
    out = load(tmp_path, strategy=strategy)
    assert out["e"].shape == (0, 3) and out["z"].shape == (0,)


def test_mmap_tensors_are_private_copies_on_write(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, str(path))
    before = path.read_bytes()
    out = load(path, strategy="mmap")
    out["w"] += 1  # must not reach the file
    assert path.read_bytes() == before
    assert load(path, strategy="mmap")["w"].sum().item() == 0


def test_stats_report_the_load(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(100), "b": torch.ones(7)}, str(tmp_path / "m.safetensors"))
    with open_weights(tmp_path, strategy="read") as stream:
        got = dict(stream)
    assert set(got) == {"a", "b"}
    assert stream.stats.tensors == 2 and stream.stats.files == 1
    assert stream.stats.bytes == 428 and stream.stats.strategy == "read"
    assert stream.stats.waiting_s == 0.0


def test_early_close_stops_workers(every_dtype: tuple) -> None:
    path, _, _ = every_dtype
    stream = open_weights(path, strategy="bounce", **SMALL)
    it = iter(stream)
    next(it)
    stream.close()  # the rest is abandoned: workers stop and files close
    assert all(w.is_set() for w in stream._workers)


def test_duplicate_tensor_across_shards_is_refused(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "a.safetensors", {"x": ("U8", (1,), b"\x01")})
    write_safetensors(tmp_path / "b.safetensors", {"x": ("U8", (1,), b"\x02")})
    with pytest.raises(SafetensorsError, match=r"b\.safetensors.*tensor 'x'.*also appears"):
        load(tmp_path)


def test_index_naming_a_missing_tensor_is_refused(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "a.safetensors", {"x": ("U8", (1,), b"\x01")})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}}))
    with pytest.raises(WeightsFileError, match="'y'"):
        load(tmp_path)


def test_index_escaping_its_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(WeightsFileError, match="escapes"):
        load(tmp_path)


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileError, match=r"no \*\.safetensors"):
        load(tmp_path)


@pytest.mark.parametrize("bad", [{"device": "tpu"}, {"strategy": "fast"}, {"workers": 0},
                                 {"bounce_buffer_bytes": 10}, {"wait_timeout_s": -1},
                                 {"device": "cuda", "strategy": "mmap"}])
def test_options_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        LoadOptions(**bad)


def test_auto_measures_and_picks_a_strategy(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    gen = torch.Generator().manual_seed(5)
    tensors = {f"w{i}": torch.randn(1 << 20, generator=gen) for i in range(10)}  # 40 MiB
    save_file(tensors, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evicted: both are timed
    finally:
        os.close(fd)
    with open_weights(path) as cold:
        out = dict(cold)
    assert cold.stats.strategy in ("mmap", "direct")
    assert {"mmap_s", "read_s"} <= set(cold.stats.calibration)
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
    del out
    path.read_bytes()  # into the page cache (a direct load above bypassed it)
    with open_weights(path) as warm:  # cached: mapping wins without a race
        out = dict(warm)
    assert warm.stats.strategy == "mmap" and warm.stats.calibration == {"resident": 1.0}
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
