"""Benchmark for a CUDA machine: bdn's loader to the GPU against a plain pinned copy.

Self-contained (needs only torch with CUDA and this repository): writes its own
safetensors file of ``--size-gib`` (default 2 GiB, bf16, Llama-like tensor sizes) to
``--dir`` (default a temporary folder, removed afterwards), reads it once so it is in the
page cache, then times, medians of ``--runs``:

* ``bdn``       — ``serving.loader.load(path, device="cuda")`` until every copy finished:
  file → pinned bounce buffers (two per worker) → device, on per-worker streams;
* ``baseline``  — the same number of bytes already in one pinned host buffer, copied to
  the device with one ``cudaMemcpy`` (``tensor.copy_``): the ceiling of host-to-device
  bandwidth, with no file reading at all.

Prints GB/s of each and bdn ÷ baseline (goal: at least 0.80), checks that the loaded
tensors equal the file, and exits non-zero if they do not or if CUDA is missing.

Run: ``python bench/gpu_load.py [--size-gib 2] [--runs 5] [--workers 4,8,16]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.loader import BOUNCE_BUFFER_BYTES, DEFAULT_WORKERS, load

GIB = 1 << 30
HIDDEN, INTERMEDIATE = 4096, 11008


def write_model(path: Path, size_bytes: int) -> int:
    """A bf16 model of about ``size_bytes`` with random contents; returns its data bytes."""
    shapes: list[tuple[str, tuple[int, ...]]] = []
    total = 0
    i = 0
    while total < size_bytes:
        for name, shape in ((f"layers.{i}.attn.qkv", (3 * HIDDEN, HIDDEN)),
                            (f"layers.{i}.attn.o", (HIDDEN, HIDDEN)),
                            (f"layers.{i}.norm", (HIDDEN,)),
                            (f"layers.{i}.mlp.up", (INTERMEDIATE, HIDDEN)),
                            (f"layers.{i}.mlp.down", (HIDDEN, INTERMEDIATE))):
            shapes.append((name, shape))
            total += 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        i += 1
    header: dict[str, object] = {}
    pos = 0
    for name, shape in shapes:
        n = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    gen = torch.Generator().manual_seed(0)
    block = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=gen).numpy()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = pos
        while left:
            n = min(left, len(block))
            f.write(block[:n].tobytes())
            left -= n
    return pos


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", default=str(DEFAULT_WORKERS),
                    help="comma list of worker counts to try (default %(default)s)")
    ap.add_argument("--bounce-mib", type=int, default=BOUNCE_BUFFER_BYTES >> 20)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: this benchmark needs a GPU", file=sys.stderr)
        return 2
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="bdn-gpu-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "model.safetensors"
    try:
        t0 = time.perf_counter()
        nbytes = write_model(path, int(args.size_gib * GIB))
        with open(path, "rb") as f:  # into the page cache: we measure the H2D path
            while f.read(64 << 20):
                pass
        print(f"{torch.cuda.get_device_name()}; {os.cpu_count()} cpus; file "
              f"{nbytes / GIB:.2f} GiB written in {time.perf_counter() - t0:.1f} s")

        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        base: list[float] = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            base.append(time.perf_counter() - t0)
        del host, dev
        torch.cuda.empty_cache()
        base_gbs = nbytes / statistics.median(base) / 1e9
        print(f"baseline pinned cudaMemcpy: {base_gbs:6.2f} GB/s  "
              f"(runs {' '.join(f'{t:.3f}' for t in base)} s)")

        reference = load(path, device="cpu", strategy="mmap")
        for workers in (int(w) for w in args.workers.split(",")):
            opts = {"device": "cuda", "workers": workers,
                    "bounce_buffer_bytes": args.bounce_mib << 20}
            out = load(path, **opts)  # warm-up: CUDA context, allocator, pinned pool
            torch.cuda.synchronize()
            bad = [k for k, v in reference.items() if not torch.equal(out[k].cpu(), v)]
            if bad:
                print(f"MISMATCH in {len(bad)} tensors, e.g. {bad[:3]}", file=sys.stderr)
                return 1
            del out
            times: list[float] = []
            for _ in range(args.runs):
                torch.cuda.empty_cache()
                t0 = time.perf_counter()
                out = load(path, **opts)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                del out
            gbs = nbytes / statistics.median(times) / 1e9
            print(f"bdn loader, {workers:2d} workers × 2 × {args.bounce_mib} MiB pinned: "
                  f"{gbs:6.2f} GB/s = {gbs / base_gbs:.2f} × baseline (goal ≥ 0.80)  "
                  f"(runs {' '.join(f'{t:.3f}' for t in times)} s)", flush=True)
        return 0
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
