"""Benchmark: first mirror and re-mirror of a local model against ``cp -r``.

Same run, same disk, same source (warm page cache for both): ``cp -r SRC DST`` is the
baseline for the first mirror (goal: at least 0.8× cp's throughput); a re-mirror of the
unchanged folder should take under 5% of the first mirror's time (fingerprints skip
reading). Medians of several runs; the machine is shared and noisy. Dirty pages are
synced between runs, outside the timed region, so one run's writeback does not land on
the next.

``--source s3|gcs|hf`` runs the remote-source benchmark (bench/mirror_remote.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 1024**3
TENSOR_ELEMS = 4096 * 4096  # 32 MiB of fp16 per tensor


def make_model(root: Path, size_gib: float) -> int:
    """Llama-like fp16 shards of about 1 GiB each, plus config files."""
    if (root / "config.json").exists():
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = int(size_gib * GiB)
    n_tensors = max(1, total // (TENSOR_ELEMS * 2))
    per_shard = max(1, (1 * GiB) // (TENSOR_ELEMS * 2))
    shards = -(-n_tensors // per_shard)
    weight_map = {}
    for s in range(shards):
        tensors = {}
        for i in range(s * per_shard, min(n_tensors, (s + 1) * per_shard)):
            name = f"model.layers.{i // 7}.w{i % 7}.weight"
            tensors[name] = rng.integers(0, 65535, TENSOR_ELEMS, dtype=np.uint16).view(
                np.float16).reshape(4096, 4096)
            weight_map[name] = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(root / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "mirror"))
    ap.add_argument("--source", choices=["local", "s3", "gcs", "hf"], default="local")
    args, rest = ap.parse_known_args()
    if args.source != "local":
        remote = ROOT / "bench" / "mirror_remote.py"
        return subprocess.call([sys.executable, str(remote), "--source", args.source, *rest])

    work = Path(args.workdir)
    src = work / "model"
    size = make_model(src, args.size_gib)
    subprocess.run(["cat", *map(str, src.glob("*.safetensors"))], stdout=subprocess.DEVNULL)
    bdn = [sys.executable, "-m", "bdn.cli"]
    cp_s, first_s, again_s = [], [], []
    for run in range(args.runs):
        store, copy = work / f"store-{run}", work / f"copy-{run}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(copy, ignore_errors=True)
        os.sync()
        cp_s.append(timed(["cp", "-r", str(src), str(copy)]))
        os.sync()
        cmd = [*bdn, "mirror", str(src), "--ref", "bench/model:v1", "--store", str(store),
               "--json"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        first_s.append(json.loads(out.stdout)["seconds"])
        os.sync()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        again_s.append(json.loads(out.stdout)["seconds"])
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(copy, ignore_errors=True)
    gb = size / 1e9
    cp_m, first_m, again_m = (statistics.median(x) for x in (cp_s, first_s, again_s))
    print(f"bench/mirror.py: {size / GiB:.2f} GiB model, {args.runs} runs, medians")
    print(f"  cp -r           {cp_m:7.3f} s  {gb / cp_m:6.2f} GB/s")
    print(f"  bdn mirror      {first_m:7.3f} s  {gb / first_m:6.2f} GB/s   "
          f"throughput ratio ours/cp = {cp_m / first_m:.2f}x (goal >= 0.8x)")
    print(f"  bdn re-mirror   {again_m:7.3f} s  = {100 * again_m / first_m:.1f}% of first "
          f"mirror (goal < 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
