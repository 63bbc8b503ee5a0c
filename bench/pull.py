"""Bench: a node pull through the cache server vs ``aria2c -x 8 -s 8`` from nginx.

    python bench/pull.py [--size-gib 2] [--runs 3] [--workdir .bench/pull]

One model file of ``--size-gib`` random bytes (random: no compression can help either
side) is mirrored into a blob store; a ``bdn cache-server`` serves it over loopback and
is warmed once, so both contenders read from a server's disk cache with ``sendfile``.
Then, alternating, each run:

* **bdn**: the agent's engine (in-process: the same code the daemon runs) pulls the
  model into a fresh node cache — ranged requests, every chunk BLAKE3-verified,
  ``pwrite`` into a preallocated partial file, journal, fsync, rename, hardlink mount;
* **aria2c**: ``aria2c -x 8 -s 8 --file-allocation=falloc`` downloads the same bytes
  from nginx (``sendfile on``) onto the same disk (no verification).

Medians are printed with the ratio bdn ÷ aria2c (goal ≥ 1.0), followed by a pull that
hits the node cache (goal < 0.5 s whatever the size), and a breakdown of where the time
goes (receive only; receive + BLAKE3; receive + BLAKE3 + ``pwrite``) measured with the
same connections, because on this machine writing fresh page-cache pages, not the
network, is the bound. Needs ``aria2c`` and ``nginx`` on PATH; the bdn part runs
without them (the comparison is then skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import blake3  # noqa: E402
import numpy as np  # noqa: E402

from agent.engine import Engine, parse_request  # noqa: E402
from agent.options import MAX_CONNECTIONS, AgentOptions  # noqa: E402
from bdn.mirror import Mirror  # noqa: E402
from bdn.sources import open_source  # noqa: E402
from bdn.store import BlobStore  # noqa: E402
from manifests.refs import Ref  # noqa: E402
from tests.support.procs import ServiceProcess, bdn_command, free_port, wait_http  # noqa: E402

GiB = 1024 ** 3
TENSOR_BYTES = 64 * 1024 * 1024
REF = "bench/pull:v1"
ARIA2_CONNECTIONS = 8
CACHE_HIT_GOAL_S = 0.5


def make_model(src: Path, size_gib: float) -> Path:
    """One safetensors file of random fp16 tensors (64 MiB each)."""
    from safetensors.numpy import save_file

    src.mkdir(parents=True, exist_ok=True)
    path = src / "model.safetensors"
    n = max(1, int(size_gib * GiB) // TENSOR_BYTES)
    if path.exists() and path.stat().st_size > n * TENSOR_BYTES:
        return path
    rng = np.random.default_rng(0)
    tensors = {f"layers.{i}.weight": np.frombuffer(rng.bytes(TENSOR_BYTES), dtype=np.float16)
               .reshape(4096, -1) for i in range(n)}
    save_file(tensors, str(path))
    path.chmod(0o644)
    return path


def mirror(store: Path, src: Path) -> None:
    """Mirror ``src`` under REF unless the store already holds exactly these bytes."""
    bs = BlobStore(str(store))
    want = sum(p.stat().st_size for p in src.iterdir())
    try:
        _, manifest = bs.resolve(REF)
        if manifest.total_size == want:
            return
    except Exception:
        pass
    source = open_source(str(src))
    try:
        Mirror(bs).run(source, ref=Ref.parse(REF))
    finally:
        source.close()


def drop_tree(path: Path) -> None:
    if path.exists():
        for dirpath, _dirs, _files in os.walk(path):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(path)


async def _pull(options: AgentOptions, mount: Path) -> tuple[float, dict[str, int]]:
    engine = Engine(options)
    try:
        t0 = time.perf_counter()
        pull, _ = await engine.submit(parse_request({"ref": REF, "mount": str(mount)}))
        await engine.wait(pull)
        seconds = time.perf_counter() - t0
        if pull.state != "done":
            raise SystemExit(f"bdn pull failed: {pull.error}")
        return seconds, dict(pull.bytes_by_tier)
    finally:
        await engine.close()


def bdn_pull(work: Path, cache_url: str, run: int,
             connections: int = MAX_CONNECTIONS) -> tuple[float, dict[str, int]]:
    node = work / "node"
    drop_tree(node)
    drop_tree(work / "mnt")
    subprocess.run(["sync"], check=False)
    options = AgentOptions(cache_dir=node, budget_bytes=64 * GiB, peers=(cache_url,),
                           strict=True, max_connections=connections)
    return asyncio.run(_pull(options, work / "mnt" / f"run{run}"))


def cache_hit_pull(work: Path, cache_url: str) -> float:
    options = AgentOptions(cache_dir=work / "node", budget_bytes=64 * GiB,
                           peers=(cache_url,), strict=True)
    seconds, tiers = asyncio.run(_pull(options, work / "mnt" / "hit"))
    assert tiers["cluster"] == 0 and tiers["store"] == 0, tiers
    return seconds


def check_bytes(work: Path, model: Path) -> None:
    """The last pull's mount is byte-identical to the source (outside the timing)."""
    mounted = next((work / "mnt").glob("run*/model.safetensors"))
    with open(mounted, "rb") as a, open(model, "rb") as b:
        while True:
            x, y = a.read(64 << 20), b.read(64 << 20)
            if x != y:
                raise SystemExit(f"{mounted} differs from {model}")
            if not x:
                return


def aria2_pull(work: Path, url: str) -> float:
    out = work / "aria2"
    drop_tree(out)
    out.mkdir(parents=True)
    subprocess.run(["sync"], check=False)
    t0 = time.perf_counter()
    subprocess.run(["aria2c", "-x", str(ARIA2_CONNECTIONS), "-s", str(ARIA2_CONNECTIONS),
                    "--file-allocation=falloc", "--allow-overwrite=true", "-q",
                    "--auto-file-renaming=false", "-d", str(out), url], check=True)
    return time.perf_counter() - t0


def start_nginx(work: Path, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
user root;
worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {work}/nginx-tmp;
    proxy_temp_path {work}/nginx-tmp;
    fastcgi_temp_path {work}/nginx-tmp;
    uwsgi_temp_path {work}/nginx-tmp;
    scgi_temp_path {work}/nginx-tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
""")
    (work / "nginx-tmp").mkdir(exist_ok=True)
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"],
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/model.safetensors"
    wait_http(url)
    return proc, url


def breakdown(cache_url: str, store: Path, work: Path, threads: int) -> dict[str, float]:
    """GB/s for receive only, + BLAKE3, + pwrite into a fresh preallocated file."""
    _, manifest = BlobStore(str(store)).resolve(REF)
    entry = manifest.files[0]
    parts = urlsplit(cache_url)
    out: dict[str, float] = {}
    for mode in ("receive", "receive+blake3", "receive+blake3+pwrite"):
        path = work / "breakdown.bin"
        if path.exists():
            path.unlink()
        subprocess.run(["sync"], check=False)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.posix_fallocate(fd, 0, entry.size)
        local = threading.local()

        def job(c, mode=mode, fd=fd, local=local):  # type: ignore[no-untyped-def]
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(parts.hostname, parts.port)
                local.buf = bytearray(32 * 1024 * 1024)
            conn.request("GET", f"/v1/objects/{c.digest}")
            resp = conn.getresponse()
            view = memoryview(local.buf)[:c.length]
            got = 0
            while got < c.length:
                got += resp.readinto(view[got:])
            resp.read()
            if "blake3" in mode:
                blake3.blake3(view, max_threads=blake3.blake3.AUTO).digest()
            if "pwrite" in mode:
                done = 0
                while done < c.length:
                    done += os.pwrite(fd, view[done:], c.offset + done)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(job, entry.chunks))
        out[mode] = entry.size / (time.perf_counter() - t0) / 1e9
        os.close(fd)
        path.unlink()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "pull"))
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--connections", type=int, default=MAX_CONNECTIONS,
                    help="the agent's connection cap (default %(default)s)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, store = work / "src", work / "store"
    print(f"model: {args.size_gib} GiB of random fp16, {args.runs} runs each, in {work}")
    model = make_model(src, args.size_gib)
    size = model.stat().st_size
    mirror(store, src)
    have_aria2 = shutil.which("aria2c") is not None and shutil.which("nginx") is not None
    cache = ServiceProcess(bdn_command("cache-server", "--store", str(store), "--dir",
                                       str(work / "cache"), "--budget-bytes",
                                       str(int(size * 2)), "--listen", "127.0.0.1:0"))
    nginx = None
    try:
        assert cache.url is not None
        warm_s, _ = bdn_pull(work, cache.url, 0)  # fills the cache server from the store
        print(f"warm-up pull (cache server filling from the store): {warm_s:.2f} s")
        if have_aria2:
            nginx, aria_url = start_nginx(work, src)
            aria2_pull(work, aria_url)  # warms nginx's page cache alike
        ours: list[float] = []
        theirs: list[float] = []
        for run in range(1, args.runs + 1):
            seconds, tiers = bdn_pull(work, cache.url, run, args.connections)
            if tiers["cluster"] != size:
                raise SystemExit(f"run {run}: expected {size} bytes from the cache server, "
                                 f"got {tiers}")
            ours.append(seconds)
            line = f"run {run}: bdn {size / seconds / 1e9:.2f} GB/s ({seconds:.2f} s)"
            if have_aria2:
                a = aria2_pull(work, aria_url)
                theirs.append(a)
                line += f"   aria2c {size / a / 1e9:.2f} GB/s ({a:.2f} s)"
            print(line, flush=True)
        check_bytes(work, model)
        hit = cache_hit_pull(work, cache.url)
        med = statistics.median(ours)
        print(f"\nbdn pull, cache server → node, verified: median {size / med / 1e9:.2f} GB/s "
              f"({med:.2f} s for {size / GiB:.2f} GiB)")
        if theirs:
            amed = statistics.median(theirs)
            print(f"aria2c -x 8 -s 8 from nginx (sendfile):   median {size / amed / 1e9:.2f} "
                  f"GB/s ({amed:.2f} s)")
            print(f"ratio bdn ÷ aria2c throughput: {amed / med:.2f} (goal ≥ 1.0)")
        else:
            print("aria2c/nginx not installed: comparison skipped "
                  "(apt-get install -y aria2 nginx)")
        print(f"node cache hit pull: {hit:.3f} s (goal < {CACHE_HIT_GOAL_S} s)")
        if not args.no_breakdown:
            print(f"\nwhere the time goes ({args.connections} connections, same server):")
            for mode, gbs in breakdown(cache.url, store, work, args.connections).items():
                print(f"  {mode:<24} {gbs:.2f} GB/s")
    finally:
        cache.stop()
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        drop_tree(work / "node")
        drop_tree(work / "mnt")
        drop_tree(work / "aria2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
