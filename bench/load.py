"""Benchmark: bdn's safetensors loader against the loaders people use, on the same bytes.

Generates a Llama-shaped model file (bf16, ``--size-gib``, default 2 GiB) once under
``.bench/load/``, then times, in the same run and interleaved round by round:

* ``bdn``                 — ``serving.loader.iter_tensors(path, device="cpu")`` (auto)
* ``safetensors``         — ``safetensors.torch.load_file``
* ``runai``               — ``runai_model_streamer.SafetensorsStreamer``
* ``tensorizer``          — ``tensorizer.TensorDeserializer`` on a ``.tensors`` copy

each until every byte of every tensor has been read (a sum over each tensor viewed as
integers: lazily mapped loaders pay for their page faults too). ``warm``: the files are
in the page cache; ``cold``: evicted with ``posix_fadvise(DONTNEED)`` before each run.
Medians of ``--runs`` (default 5). Ratios are time(bdn) ÷ time(baseline): below 1.0 bdn
is faster.

Then streaming: the file is copied into place at a throttled rate R (default: the rate
at which bdn's owned-buffer ``read`` strategy loads it warm, so download and load cost the
same) while bdn loads it through a readiness source, against download-then-load.
Claims checked: all tensors loaded within 1.15 × bytes/R + 0.5 s, and ≥ 1.5× sooner
than download-then-load.

Run: ``.venv/bin/python bench/load.py [--size-gib 2] [--runs 5] [--skip runai,tensorizer]``
(baselines need ``pip install runai-model-streamer tensorizer``; missing ones are
skipped with a note).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.loader import iter_tensors, load, open_weights
from serving.readiness import ProgressiveReadiness

GIB = 1 << 30
MIB = 1 << 20
HIDDEN = 2048
INTERMEDIATE = 5632
VOCAB = 32000
STREAM_CHUNK_BYTES = 16 * MIB


def model_layout(size_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a bf16 Llama-like model of about ``size_bytes``."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * 2
    layers = max(1, (size_bytes - 2 * VOCAB * HIDDEN * 2) // per_layer)
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (HIDDEN,)),
                (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
                (f"{p}.self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
                (f"{p}.self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
                (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
                (f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
                (f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                (f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def generate(path: Path, size_bytes: int) -> None:
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in model_layout(size_bytes):
        n = int(np.prod(shape))
        raw = rng.integers(0, 2**16, size=n, dtype=np.uint16)
        tensors[name] = torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    _fsync(tmp)
    tmp.rename(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(paths: Iterable[Path]) -> None:
    gc.collect()  # mapped pages cannot be evicted while a tensor still maps them
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def touch(t: torch.Tensor) -> int:
    """Read every byte of ``t`` (summed as the widest integer type its bytes allow)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return 0
    b = flat.view(torch.uint8)
    for wide in (torch.int64, torch.int32, torch.int16):
        size = wide.itemsize
        if b.numel() % size == 0 and b.data_ptr() % size == 0:
            return int(b.view(wide).sum())
    return int(b.sum())


def run_bdn(path: Path, _: Path) -> int:
    # Touched as yielded, like runai's: reading the rest overlaps with the touching.
    return sum(touch(t) for _name, t in iter_tensors(path, device="cpu"))


def run_safetensors(path: Path, _: Path) -> int:
    from safetensors.torch import load_file

    return sum(touch(t) for t in load_file(str(path)).values())


def run_runai(path: Path, _: Path) -> int:
    from runai_model_streamer import SafetensorsStreamer

    total = 0
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(path))
        # Tensors are touched as yielded: runai may reuse the memory afterwards.
        for _name, t in streamer.get_tensors():
            total += touch(t)
    return total


def run_tensorizer(_: Path, tpath: Path) -> int:
    from tensorizer import TensorDeserializer

    with TensorDeserializer(str(tpath), device="cpu") as d:
        return sum(touch(t) for t in d.values())


def ensure_tensorizer_copy(path: Path, tpath: Path) -> None:
    if tpath.exists():
        return
    from safetensors.torch import load_file
    from tensorizer import TensorSerializer

    tmp = tpath.with_suffix(".tmp")
    ser = TensorSerializer(str(tmp))
    ser.write_state_dict(load_file(str(path)))
    ser.close()
    _fsync(tmp)
    tmp.rename(tpath)


def median_runs(loaders: dict[str, Callable[[Path, Path], int]], path: Path, tpath: Path,
                runs: int, cold: bool) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(runs):  # round-robin so drift hits every loader alike
        for name, fn in loaders.items():
            if cold:
                evict([path, tpath] if tpath.exists() else [path])
            else:
                fn(path, tpath)  # make sure it is warm (and the allocator too)
            gc.collect()
            t0 = time.perf_counter()
            fn(path, tpath)
            times[name].append(time.perf_counter() - t0)
            gc.collect()
    return times


def streaming(path: Path, workdir: Path, rate: float, runs: int) -> dict[str, float]:
    """Throttled copy + streaming load vs copy-then-load; medians of ``runs``."""
    size = path.stat().st_size
    dst = workdir / "stream.safetensors"
    t_stream: list[float] = []
    t_copy: list[float] = []
    t_after: list[float] = []
    for _ in range(runs):
        dst.unlink(missing_ok=True)
        with open(dst, "wb") as f:
            f.truncate(size)
        ready = ProgressiveReadiness()
        finished: list[float] = []

        def writer(ready: ProgressiveReadiness = ready, finished: list[float] = finished) -> None:
            src = os.open(path, os.O_RDONLY)
            out = os.open(dst, os.O_WRONLY)
            try:
                start = time.perf_counter()
                off = 0
                while off < size:
                    n = min(STREAM_CHUNK_BYTES, size - off)
                    done = 0
                    while done < n:  # an in-kernel copy: the writer should cost little CPU
                        done += os.copy_file_range(src, out, n - done, off + done, off + done)
                    ready.mark(dst, off, off + n, size=size)
                    off += n
                    # Throttle to R: a rate limiter, not a synchronisation.
                    ahead = start + off / rate - time.perf_counter()
                    if ahead > 0:
                        time.sleep(ahead)
                finished.append(time.perf_counter() - start)
                ready.finish()
            finally:
                os.close(src)
                os.close(out)

        t0 = time.perf_counter()
        w = threading.Thread(target=writer)
        w.start()
        for _name, t in iter_tensors(dst, readiness=ready, strategy="read"):
            touch(t)
        t_stream.append(time.perf_counter() - t0)
        w.join()
        t_copy.append(finished[0])
        gc.collect()
        t1 = time.perf_counter()
        sum(touch(t) for t in load(dst, strategy="read").values())
        t_after.append(time.perf_counter() - t1)
        gc.collect()
    dst.unlink(missing_ok=True)
    return {"stream_s": statistics.median(t_stream), "copy_s": statistics.median(t_copy),
            "load_after_s": statistics.median(t_after)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path(".bench/load"))
    ap.add_argument("--skip", default="", help="comma list: runai,tensorizer,safetensors,"
                    "warm,cold,stream")
    ap.add_argument("--stream-rate-mbps", type=float, default=0.0,
                    help="R in MB/s for the streaming test (0: bdn's warm read rate)")
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    args.dir.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GIB)
    path = args.dir / f"model-{args.size_gib:g}g.safetensors"
    tpath = args.dir / f"model-{args.size_gib:g}g.tensors"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        generate(path, size)
    nbytes = path.stat().st_size
    loaders: dict[str, Callable[[Path, Path], int]] = {"bdn": run_bdn}
    if "safetensors" not in skip:
        loaders["safetensors"] = run_safetensors
    for name, fn, module in (("runai", run_runai, "runai_model_streamer"),
                             ("tensorizer", run_tensorizer, "tensorizer")):
        if name in skip:
            continue
        try:
            __import__(module)
        except ImportError:
            print(f"note: {module} is not installed; skipping {name} "
                  "(pip install runai-model-streamer tensorizer)")
            continue
        loaders[name] = fn
    if "tensorizer" in loaders:
        print("preparing the tensorizer copy ...", flush=True)
        ensure_tensorizer_copy(path, tpath)
    # Correctness before speed: every loader must read the same bytes.
    sums = {name: fn(path, tpath) for name, fn in loaders.items()}
    assert len(set(sums.values())) == 1, f"loaders disagree on the bytes: {sums}"
    with open_weights(path) as s:
        dict(s)
    print(f"model: {nbytes / GIB:.2f} GiB, {len(model_layout(size))} tensors; "
          f"torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}; "
          f"bdn auto chose '{s.stats.strategy}' (calibration {s.stats.calibration})")
    print(f"{'mode':5} {'loader':12} {'median s':>9} {'GB/s':>7} {'bdn ÷ it':>9}   runs (s)")
    for mode in ("warm", "cold"):
        if mode in skip:
            continue
        times = median_runs(loaders, path, tpath, args.runs, cold=mode == "cold")
        ours = statistics.median(times["bdn"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{mode:5} {name:12} {med:9.3f} {nbytes / med / 1e9:7.2f} "
                  f"{ours / med:9.2f}   " + " ".join(f"{t:.3f}" for t in ts), flush=True)
    if "stream" not in skip:
        rate = args.stream_rate_mbps * 1e6
        if rate <= 0:
            load(path, strategy="read")  # warm
            t0 = time.perf_counter()
            sum(touch(t) for t in load(path, strategy="read").values())
            rate = nbytes / (time.perf_counter() - t0)
        res = streaming(path, args.dir, rate, max(1, min(args.runs, 3)))
        # The bound uses the rate the bytes really arrived at (the writer can fall
        # behind the throttle on a busy machine; that is not the loader's time).
        arrived = max(nbytes / rate, res["copy_s"])
        bound = 1.15 * arrived + 0.5
        dtl = res["copy_s"] + res["load_after_s"]
        print(f"stream: R = {rate / 1e6:.0f} MB/s target, {nbytes / arrived / 1e6:.0f} MB/s "
              f"achieved (last byte at {arrived:.3f} s); "
              f"streamed load done at {res['stream_s']:.3f} s (bound 1.15×bytes/R+0.5 = "
              f"{bound:.3f} s: {'ok' if res['stream_s'] <= bound else 'MISSED'}); "
              f"download-then-load {dtl:.3f} s ({res['copy_s']:.3f} + "
              f"{res['load_after_s']:.3f}) → {dtl / res['stream_s']:.2f}× sooner "
              f"(goal ≥ 1.5×: {'ok' if dtl / res['stream_s'] >= 1.5 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
