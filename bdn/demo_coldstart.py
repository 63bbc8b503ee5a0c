"""The cold-start half of ``make demo`` (see bdn/demo.py).

Until the node agent, cluster cache and serving runtime exist this exports the model
with the simple verified read path, so the demo always runs the job as far as it exists.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bdn.progress import human_bytes


def run(workdir: Path, store: str, base_ref: str, tuned_ref: str) -> int:
    print(f"\n== cold start from {base_ref} (export, verified)")
    dest = workdir / "replica"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bdn.cli", "export", base_ref, str(dest), "--store",
                    store], check=True)
    print(f"   {time.perf_counter() - t0:.2f} s from the blob store")
    stats = subprocess.run([sys.executable, "-m", "bdn.cli", "store", "stats", "--json",
                            "--store", store], check=True, capture_output=True, text=True)
    doc = json.loads(stats.stdout)
    print(f"\nstore: {doc['objects']} objects, {human_bytes(doc['bytes_stored'])} stored for "
          f"{human_bytes(doc['logical_bytes_referenced'])} of models")
    return 0
