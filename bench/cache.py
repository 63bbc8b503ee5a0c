"""Benchmark: the cluster cache against nginx serving the same files with sendfile.

Warm: ``--clients`` parallel clients (curl, one process each, keep-alive) pull a warm
object set of ``--size-gib`` in ``--range-mib`` byte ranges, from ``bdn cache-server``
(``--workers`` processes, default the server's: 1) and from nginx (``sendfile on``,
``--nginx-workers`` processes, default one per CPU) whose root is the cache's own object
folder — the same files, same run, alternating, ``--runs`` times; medians and the ratio
ours ÷ nginx. A bare aiohttp ``FileResponse`` server (``bench/aiohttp_files.py``) on the
same folder takes its turn too: the issue's reference for what the cache's own
bookkeeping may cost.

Cold: a fresh cache (empty folder) is filled from a local blob store by the same
clients requesting whole objects, against reading the store's files directly with
``--clients`` threads (no HTTP, no hashing) — what read-through plus verification costs.

Everything runs on loopback; nginx and the cache are started here and stopped by PID.
Data lives under ``.bench/cache`` (reused across runs unless ``--fresh``).

    .venv/bin/python bench/cache.py --size-gib 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bdn.store import BlobStore  # noqa: E402
from manifests.digest import Digest, Hasher  # noqa: E402
from tests.support.procs import ServiceProcess, bdn_command, free_port, wait_http  # noqa: E402

MIB = 1024 * 1024
READ_BLOCK_BYTES = 4 * MIB

NGINX_CONF = """
daemon off;
master_process on;
user root;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ default_type application/octet-stream; }}
    }}
}}
"""


def make_store(store_dir: Path, size_gib: float, object_mib: int, fresh: bool) -> list[Digest]:
    listing = store_dir / "bench-objects.txt"
    n = max(1, int(size_gib * 1024 / object_mib))
    if not fresh and listing.exists():
        digests = [Digest.parse(x) for x in listing.read_text().split()]
        if len(digests) == n:
            return digests
    shutil.rmtree(store_dir, ignore_errors=True)
    store = BlobStore(str(store_dir))
    rng = np.random.default_rng(7)
    digests = []
    for _ in range(n):
        data = rng.integers(0, 256, object_mib * MIB, dtype=np.uint8).tobytes()
        d = Digest.of(data)
        store.put_chunk(d, data)  # random bytes: stored raw
        digests.append(d)
    listing.write_text("\n".join(map(str, digests)))
    return digests


def curl_config(urls_ranges: list[tuple[str, str | None]]) -> str:
    parts = []
    for url, rng in urls_ranges:
        lines = ['silent', 'fail', 'output = "/dev/null"', f'url = "{url}"',
                 'write-out = "%{size_download}\\n"']
        if rng:
            lines.insert(0, f'range = "{rng}"')
        parts.append("\n".join(lines))
    return "\nnext\n".join(parts) + "\n"


def run_clients(jobs: list[list[tuple[str, str | None]]], tmp: Path) -> tuple[float, int]:
    """Run one curl per job list in parallel; (seconds, bytes received)."""
    cfgs = []
    for i, job in enumerate(jobs):
        p = tmp / f"client{i}.cfg"
        p.write_text(curl_config(job))
        cfgs.append(p)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-K", str(c)], stdout=subprocess.PIPE, text=True)
             for c in cfgs]
    outs = [p.communicate()[0] for p in procs]
    elapsed = time.perf_counter() - t0
    for p in procs:
        if p.returncode != 0:
            raise SystemExit(f"curl failed with {p.returncode}")
    total = sum(int(x) for out in outs for x in out.split())
    return elapsed, total


def ranged_jobs(base: str, paths: list[str], object_bytes: int, range_bytes: int,
                clients: int) -> list[list[tuple[str, str | None]]]:
    jobs: list[list[tuple[str, str | None]]] = [[] for _ in range(clients)]
    for i, path in enumerate(paths):
        for start in range(0, object_bytes, range_bytes):
            end = min(start + range_bytes, object_bytes) - 1
            jobs[i % clients].append((f"{base}/{path}", f"{start}-{end}"))
    return jobs


def run_split(worker: Callable[[list[Any]], None], items: list[Any], clients: int) -> float:
    """Run ``worker`` on ``clients`` threads, each over every ``clients``-th item; the
    wall-clock seconds until all finished."""
    threads = [threading.Thread(target=worker, args=(items[i::clients],))
               for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def read_store_directly(store_dir: Path, digests: list[Digest], clients: int) -> float:
    store = BlobStore(str(store_dir))
    paths = [Path(store.url) / f"objects/b3/{d.hex[:2]}/{d.hex[2:4]}/{d.hex}" for d in digests]
    total = [0]
    lock = threading.Lock()

    def worker(mine: list[Path]) -> None:
        buf = bytearray(READ_BLOCK_BYTES)
        n = 0
        for p in mine:
            with open(p, "rb", buffering=0) as f:
                while k := f.readinto(buf):
                    n += k
        with lock:
            total[0] += n

    seconds = run_split(worker, paths, clients)
    return total[0] / seconds


def copy_and_hash_directly(store_dir: Path, digests: list[Digest], clients: int,
                           out_dir: Path) -> float:
    """What any verifying cache must do at least: read, hash and write each object."""
    store = BlobStore(str(store_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    total = [0]
    lock = threading.Lock()

    def worker(mine: list[Digest]) -> None:
        n = 0
        for d in mine:
            h = Hasher()
            fd = os.open(out_dir / d.hex, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for block in store.iter_object(d, MIB):
                    h.update(block)
                    os.write(fd, block)
                    n += len(block)
            finally:
                os.close(fd)
            assert h.digest() == d
        with lock:
            total[0] += n

    seconds = run_split(worker, digests, clients)
    rate = total[0] / seconds
    shutil.rmtree(out_dir, ignore_errors=True)
    return rate


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--object-mib", type=int, default=16)
    ap.add_argument("--range-mib", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--nginx-workers", default="auto")
    ap.add_argument("--send-threads", type=int, default=None,
                    help="pass --send-threads to the cache server (default: its own)")
    ap.add_argument("--workers", type=int, default=None,
                    help="pass --workers to the cache server (default: its own, 1)")
    ap.add_argument("--dir", default=str(ROOT / ".bench" / "cache"))
    ap.add_argument("--fresh", action="store_true", help="regenerate the object set")
    args = ap.parse_args()
    if shutil.which("nginx") is None or shutil.which("curl") is None:
        print("bench/cache.py needs nginx and curl (apt-get install -y nginx curl)")
        return 2

    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    store_dir = base / "store"
    digests = make_store(store_dir, args.size_gib, args.object_mib, args.fresh)
    object_bytes = args.object_mib * MIB
    total_bytes = object_bytes * len(digests)
    print(f"object set: {len(digests)} × {args.object_mib} MiB = "
          f"{total_bytes / 2**30:.2f} GiB; {args.clients} clients; "
          f"ranges of {args.range_mib} MiB; {args.runs} runs; {os.cpu_count()} CPUs")

    cache_dir = base / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    budget = str(total_bytes * 2)
    procs: list[ServiceProcess] = []
    nginx: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(dir=base) as tmp_s:
        tmp = Path(tmp_s)
        try:
            cache = ServiceProcess(bdn_command(
                "cache-server", "--store", str(store_dir), "--dir", str(cache_dir),
                "--budget-bytes", budget, "--listen", "127.0.0.1:0",
                *([] if args.send_threads is None else
                  ["--send-threads", str(args.send_threads)]),
                *([] if args.workers is None else ["--workers", str(args.workers)])))
            procs.append(cache)
            # Cold: every object filled from the store through the cache, whole.
            whole = [[(f"{cache.url}/v1/objects/{d}", None) for d in digests[i::args.clients]]
                     for i in range(args.clients)]
            direct = read_store_directly(store_dir, digests, args.clients)  # warms the store
            copy = copy_and_hash_directly(store_dir, digests, args.clients, tmp / "copy")
            secs, got = run_clients(whole, tmp)
            assert got == total_bytes, (got, total_bytes)
            cold = gbps(got, secs)
            print(f"cold fill through the cache (HTTP, verified, kept): {cold:.2f} GB/s\n"
                  f"  reading the store directly (no HTTP, no hash, nothing kept): "
                  f"{direct / 1e9:.2f} GB/s → ratio {cold / (direct / 1e9):.2f}\n"
                  f"  read + BLAKE3 + write directly (floor of a verifying cache): "
                  f"{copy / 1e9:.2f} GB/s → ratio {cold / (copy / 1e9):.2f}")

            port = free_port()
            ndir = tmp / "nginx"
            ndir.mkdir()
            conf = ndir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(workers=args.nginx_workers, dir=ndir, port=port,
                                              root=cache_dir / "objects"))
            nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(ndir)],
                                     start_new_session=True)
            nginx_url = f"http://127.0.0.1:{port}"
            wait_http(nginx_url)

            aio_port = free_port()
            aio = ServiceProcess([sys.executable, str(ROOT / "bench/aiohttp_files.py"),
                                  str(cache_dir / "objects"), str(aio_port)],
                                 ready_prefix=None)
            procs.append(aio)
            aio_url = f"http://127.0.0.1:{aio_port}"
            wait_http(aio_url, proc=aio)

            ours_paths = [f"v1/objects/{d}" for d in digests]
            file_paths = [f"{d.hex[:2]}/{d.hex[2:4]}/{d.hex}" for d in digests]
            jobs_of = {name: ranged_jobs(url, paths, object_bytes, args.range_mib * MIB,
                                         args.clients)
                       for name, url, paths in (("ours", cache.url, ours_paths),
                                                ("nginx", nginx_url, file_paths),
                                                ("aiohttp", aio_url, file_paths))}
            results: dict[str, list[float]] = {name: [] for name in jobs_of}
            names = list(jobs_of)
            for r in range(args.runs):
                # Each run takes the three in turn, starting one further along each time.
                for name in names[r % 3:] + names[:r % 3]:
                    secs, got = run_clients(jobs_of[name], tmp)
                    assert got == total_bytes, (name, got, total_bytes)
                    results[name].append(gbps(got, secs))
                print(f"run {r + 1}: ours {results['ours'][-1]:.2f} GB/s   "
                      f"nginx {results['nginx'][-1]:.2f} GB/s   "
                      f"bare aiohttp {results['aiohttp'][-1]:.2f} GB/s")
            ours = statistics.median(results["ours"])
            theirs = statistics.median(results["nginx"])
            # Each run measures both back to back, so the per-run ratio cancels load that
            # drifts between runs (other work on the machine); its median is the figure.
            paired = statistics.median(o / n for o, n in zip(results["ours"],
                                                             results["nginx"], strict=True))
            print(f"warm, median of {args.runs}: ours {ours:.2f} GB/s   nginx {theirs:.2f} GB/s"
                  f"   ratio of medians {ours / theirs:.2f}   median per-run ratio "
                  f"ours/nginx {paired:.2f} (goal ≥ 1.0)")
            aio = statistics.median(results["aiohttp"])
            paired_aio = statistics.median(o / a for o, a in zip(results["ours"],
                                                                 results["aiohttp"],
                                                                 strict=True))
            print(f"  bare aiohttp FileResponse (no bookkeeping): {aio:.2f} GB/s   median "
                  f"per-run ratio ours/aiohttp {paired_aio:.2f}")
        finally:
            if nginx is not None:
                os.killpg(nginx.pid, signal.SIGTERM)
                nginx.wait(10)
            for p in procs:
                p.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
