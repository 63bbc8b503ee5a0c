"""Bench: a simulated fleet — N agents pull one model at once through 3 cache pods.

    sudo python bench/fleet.py [--agents 1,4,8,16,32] [--model-mib 512] [--piece-mib 8]
        [--store-mbit 2000] [--pod-mbit 1000] [--agent-mbit 1000] [--workdir .bench/fleet]
        [--no-faults] [--verbose]

Needs root, ``ip`` and ``tc`` (iproute2). Everything runs on this machine in network
namespaces the bench creates and names ``bdnf<pid>-*``: a hub namespace holding a
bridge, and one namespace per process (the store, 3 cache pods, N agents), each joined
to the bridge by a veth pair created inside the namespaces, on the private range
10.213.0.0/16. No address outside those namespaces is ever used, and the root
namespace's links are not touched. Each veth is shaped with ``tc tbf`` in both
directions (the store's, the pods' and the agents' links). The blob store is a folder
served over HTTP by ``tests/cache/store_http.py``, which counts the bytes it sends:
the origin bytes, counted outside bdn. Agents are reached over their unix sockets
(the filesystem is shared between namespaces).

Per N it prints: pull time p50/p99/max next to the bound the shaping implies, origin
bytes ÷ model bytes, bytes per pod and max ÷ mean, bytes by tier — with node-to-node
sharing off and on; then a run with one pod hung (``SIGSTOP``) mid-pull and one with a
pod killed, at the largest N. Goals (issue 17): origin ÷ model = 1.00 for every N; with
the pods' egress capped and sharing on, p99 at N = 32 ≤ 1.3 × p99 at N = 1; balance
≤ 1.05; hung pod ≤ +2 s against the killed one.

Teardown: every process by PID (its process group), every namespace by the name this
run gave it (the veths and the bridge go with their namespaces), also on Ctrl-C.

Disk: each run's folder (``<workdir>/runs/<run>``: its pods' caches, its agents' node
caches and mounts) is removed as soon as the run's figures are taken (and on Ctrl-C),
so the disk holds one run at a time — kept, a 512 MiB model at N = 1…32 filled 63 GB.
Before anything is written, free space under ``--workdir`` is checked against what the
largest run needs (:func:`run_bytes_needed`); if it does not fit, the bench says so
and stops. The model source and the mirrored store are kept between invocations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from agent.client import AgentClient  # noqa: E402
from bdn.mirror import Mirror, MirrorOptions  # noqa: E402
from bdn.sources import open_source  # noqa: E402
from bdn.store import BlobStore  # noqa: E402
from cache.ring import manifest_objects, place  # noqa: E402
from manifests.chunking import ChunkingOptions  # noqa: E402
from manifests.refs import Ref  # noqa: E402
from tests.support.procs import ServiceProcess, bdn_command  # noqa: E402

MiB = 1024 * 1024
REF = "bench/fleet:v1"
SUBNET = "10.213"
STORE_IP = f"{SUBNET}.0.2"
POD_IPS = [f"{SUBNET}.0.{11 + i}" for i in range(3)]
STORE_PORT = 8000
POD_PORT = 8401
PEER_PORT = 7471
STORE_HTTP = ROOT / "tests" / "cache" / "store_http.py"
# tbf queue: enough for a round trip at the link rate, as a switch port would buffer.
TBF_LATENCY_MS = 50
PULL_TIMEOUT_S = 1800.0
# Free space kept beyond a run's estimate (logs, LMDB files, the filesystem's own).
DISK_HEADROOM_BYTES = 1024 * MiB
RUNS_DIR = "runs"
ENV = {"PYTHONPATH": str(ROOT)}  # every process runs this checkout's code


def agent_ip(i: int) -> str:
    return f"{SUBNET}.{1 + i // 250}.{1 + i % 250}"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Net:
    """The namespaces, bridge and shaped veths of one bench run (see module docstring)."""

    def __init__(self, prefix: str, queue_ms: int = TBF_LATENCY_MS) -> None:
        self.prefix = prefix
        self.queue_ms = queue_ms
        self.hub = f"{prefix}-hub"
        self.namespaces: list[str] = []
        self._veths = 0

    def __enter__(self) -> Net:
        sh("ip", "netns", "add", self.hub)
        self.namespaces.append(self.hub)
        sh("ip", "-n", self.hub, "link", "set", "lo", "up")
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def teardown(self) -> None:
        """Delete every namespace this run created, by name (veths and the bridge go with
        them). Idempotent."""
        while self.namespaces:
            sh("ip", "netns", "del", self.namespaces.pop(), check=False)

    def add_node(self, name: str, ip: str, mbit: int) -> str:
        """A namespace joined to the bridge at ``ip``, its link shaped to ``mbit`` both
        ways; returns its name."""
        ns = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self._veths += 1
        hub_end = f"v{self._veths}"
        sh("ip", "-n", self.hub, "link", "add", hub_end, "type", "veth", "peer", "name",
           "eth0", "netns", ns)
        sh("ip", "-n", self.hub, "link", "set", hub_end, "master", "br0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/16", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        burst = max(64 * 1024, mbit * 1_000_000 // 8 // 250)
        for where, dev in ((self.hub, hub_end), (ns, "eth0")):  # to the node; from it
            sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", f"{mbit}mbit", "burst", str(burst), "latency", f"{self.queue_ms}ms")
        return ns

    def get(self, ns: str, url: str, body: dict | None = None) -> str:  # type: ignore[type-arg]
        """GET ``url`` (POST ``body`` as JSON) from inside ``ns`` (the root namespace has
        no route there)."""
        code = ("import sys, urllib.request; "
                "data = sys.argv[2].encode() if len(sys.argv) > 2 else None; "
                "req = urllib.request.Request(sys.argv[1], data=data, headers="
                "{'Content-Type': 'application/json'} if data else {}); "
                "sys.stdout.write(urllib.request.urlopen(req, timeout=30).read().decode())")
        extra = [json.dumps(body)] if body is not None else []
        return sh("ip", "netns", "exec", ns, sys.executable, "-c", code, url, *extra).stdout


def in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def drop_tree(path: Path) -> None:
    """Remove a previous run's folder (mounts are read-only: widen them first)."""
    if path.exists():
        for dirpath, _dirs, _files in os.walk(path):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(path)


def run_bytes_needed(model_bytes: int, n_agents: int, pods: int = len(POD_IPS)) -> int:
    """Disk one run may fill: every agent's node cache holds the model once (its mount
    is hardlinks into it, on the same disk), and every pod may hold all of it (each
    holds about a third; after a pod is killed the others refill its share)."""
    return (n_agents + pods) * model_bytes + DISK_HEADROOM_BYTES


def check_free_space(work: Path, need_bytes: int, what: str) -> str | None:
    """None if ``need_bytes`` fit under ``work``; else the sentence that says not."""
    free = shutil.disk_usage(work).free
    if free >= need_bytes:
        return None
    return (f"bench/fleet.py: not enough free space under {work}: {what} needs about "
            f"{need_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free. Use "
            f"--workdir on a larger disk, fewer --agents or a smaller --model-mib.")


def make_model(src: Path, model_mib: int, piece_mib: int) -> None:
    from safetensors.numpy import save_file

    src.mkdir(parents=True, exist_ok=True)
    path = src / "model.safetensors"
    if path.exists() and path.stat().st_size >= model_mib * MiB:
        return
    rng = np.random.default_rng(0)
    n = max(1, model_mib // piece_mib)
    tensors = {f"layers.{i}.weight": np.frombuffer(rng.bytes(piece_mib * MiB),
                                                   dtype=np.float16).reshape(256, -1)
               for i in range(n)}
    save_file(tensors, str(path))


def mirror(store: Path, src: Path, piece_mib: int) -> BlobStore:
    bs = BlobStore(str(store))
    source = open_source(str(src))
    try:
        Mirror(bs, MirrorOptions(chunking=ChunkingOptions(
            tensor_piece_bytes=piece_mib * MiB))).run(source, ref=Ref.parse(REF))
    finally:
        source.close()
    return bs


@dataclass
class RunResult:
    times_s: list[float]
    origin_bytes: int
    pod_bytes: dict[str, int]
    tiers: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    first_error: str = ""
    # Agents' answers that were first-byte timeouts, and pods' 504s to only-if-cached.
    timeouts: int = 0
    uncached: int = 0
    # Chunks peers served after waiting for their own receive (holders still receiving).
    after_wait: int = 0
    # Share of this machine's CPU time that was busy during the pulls (0…1): near 1,
    # the cores, not the shaped links, bound the pull times.
    cpu_busy: float = math.nan


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all cores, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class Fleet:
    """One run's processes: store server, 3 pods, N agents (stopped by PID)."""

    def __init__(self, args: argparse.Namespace, net: Net, work: Path) -> None:
        self.args = args
        self.net = net
        self.work = work
        self.procs: list[ServiceProcess] = []   # this run's pods and agents
        self.store: ServiceProcess | None = None
        self.store_ns = ""
        self.pod_ns: list[str] = []
        self.pods: list[ServiceProcess] = []
        self.agent_ns: list[str] = []
        self.agents: list[tuple[ServiceProcess, AgentClient]] = []
        self.run_dir: Path | None = None  # the run folder this bench made, if any

    def close(self) -> None:
        self.stop()
        self.discard_run()
        if self.store is not None:
            self.store.stop()
            self.store = None
        with contextlib.suppress(OSError):
            self.work.rmdir()  # the runs folder, if the bench made it and it is empty

    def discard_run(self) -> None:
        """Remove the current run's folder (pods' caches, node caches, mounts), by the
        name this bench gave it; its processes must be stopped first."""
        if self.run_dir is not None:
            drop_tree(self.run_dir)
            self.run_dir = None

    def stop(self) -> None:
        """Stop this run's pods and agents (by PID; the store server stays)."""
        for p in reversed(self.procs):
            if p.proc.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)  # a hung pod must hear SIGTERM
                except ProcessLookupError:
                    pass
            p.stop()
        self.procs.clear()

    def start_store(self, store_dir: Path) -> None:
        self.store_ns = self.net.add_node("store", STORE_IP, self.args.store_mbit)
        self.store = ServiceProcess(in_ns(self.store_ns, [
            sys.executable, str(STORE_HTTP), str(store_dir), "--listen",
            f"{STORE_IP}:{STORE_PORT}"]), env=ENV)

    def add_namespaces(self, n_agents: int) -> None:
        for i, ip in enumerate(POD_IPS):
            self.pod_ns.append(self.net.add_node(f"pod{i}", ip, self.args.pod_mbit))
        for i in range(n_agents):
            self.agent_ns.append(self.net.add_node(f"a{i}", agent_ip(i), self.args.agent_mbit))

    def start(self, n: int, run: str, sharing: bool) -> Path:
        """Fresh pods and N agents for one run; returns where the run's mounts go."""
        d = self.work / run
        drop_tree(d)
        d.mkdir(parents=True)
        self.run_dir = d
        store_url = f"http://{STORE_IP}:{STORE_PORT}"
        self.pods = []
        for i, ip in enumerate(POD_IPS):
            p = ServiceProcess(in_ns(self.pod_ns[i], bdn_command(
                "cache-server", "--store", store_url, "--dir", str(d / f"pod{i}"),
                "--budget-bytes", "64G", "--listen", f"{ip}:{POD_PORT}",
                *(["--prefetch-rate", "100G"] if self.args.warm_pods else []),
                *(["--fill-threads", str(self.args.pod_fill_threads)]
                  if self.args.pod_fill_threads else []))), env=ENV)
            self.procs.append(p)
            self.pods.append(p)
        peers = ",".join(f"http://{ip}:{POD_PORT}" for ip in POD_IPS)
        self.agents = []
        for i in range(n):
            sock = str(d / f"a{i}.sock")
            extra = ["--peer-listen", f"{agent_ip(i)}:{PEER_PORT}"] if sharing else []
            if sharing and self.args.agent_uploads:
                extra += ["--peer-max-uploads", str(self.args.agent_uploads)]
            if self.args.agent_connections:
                extra += ["--max-connections", str(self.args.agent_connections)]
            p = ServiceProcess(in_ns(self.agent_ns[i], bdn_command(
                "agent", "--cache-dir", str(d / f"node{i}"), "--budget-bytes", "64G",
                "--socket", sock, "--peers", peers, "--strict", *extra)), env=ENV)
            self.procs.append(p)
            self.agents.append((p, AgentClient(sock)))
        return d / "mnt"

    def origin_bytes(self) -> int:
        stats = json.loads(self.net.get(self.store_ns, f"http://{STORE_IP}:{STORE_PORT}/_stats"))
        return int(stats["bytes"].get("objects", 0))

    def pod_bytes(self, skip: frozenset[int] | set[int] = frozenset()) -> dict[str, int]:
        out = {}
        for i, ip in enumerate(POD_IPS):
            if i in skip:
                continue
            text = self.net.get(self.pod_ns[i], f"http://{ip}:{POD_PORT}/metrics")
            out[f"pod{i}"] = int(metric(text, "bdn_cache_bytes_served_total"))
            if self.args.verbose:
                print(f"    pod{i}: " + ", ".join(
                    f"{k[10:]} {metric(text, k):.0f}" for k in (
                        "bdn_cache_misses_total", "bdn_cache_store_object_reads_total",
                        "bdn_cache_bytes_filled_total", "bdn_cache_evictions_total",
                        "bdn_cache_invalidations_total", "bdn_cache_prefetch_filled_total",
                        "bdn_cache_fill_failures_total")), flush=True)
        return out

    def warm_pods(self) -> None:
        """Each pod prefetches the objects it owns (as a deploy would ask it to) and the
        pulls start once every fill is done: no pull then waits on the store's link."""
        urls = [f"http://{ip}:{POD_PORT}" for ip in POD_IPS]
        for i, url in enumerate(urls):
            self.net.get(self.pod_ns[i], f"{url}/v1/prefetch",
                         {"ref": REF, "peers": urls, "self": url})
        deadline = time.monotonic() + PULL_TIMEOUT_S
        for i, url in enumerate(urls):
            while time.monotonic() < deadline:
                text = self.net.get(self.pod_ns[i], f"{url}/metrics")
                if (metric(text, "bdn_cache_prefetch_pending") == 0
                        and metric(text, "bdn_cache_fills_in_flight") == 0):
                    break
                time.sleep(0.2)  # polling another process's gauge, not synchronising

    def pull_all(self, mount_root: Path, fault: str | None = None) -> RunResult:
        """One pull per agent, all released at the same instant; ``fault``: ``hung`` or
        ``killed`` pod 0 once the first chunk arrived anywhere."""
        barrier = threading.Barrier(len(self.agents) + 1)
        first_chunk = threading.Event()
        times: list[float] = [math.nan] * len(self.agents)
        statuses: list[dict] = [{} for _ in self.agents]  # type: ignore[type-arg]
        t0 = [0.0]

        def one(i: int, client: AgentClient) -> None:
            barrier.wait()
            try:
                started = client.start_pull(ref=REF, mount=str(mount_root / f"m{i}"))

                def on_event(ev: dict) -> None:  # type: ignore[type-arg]
                    if ev.get("event") == "chunk":
                        first_chunk.set()
                st = client.wait(started["id"], on_event)
                statuses[i] = st
                if st.get("state") == "done":
                    times[i] = time.monotonic() - t0[0]
            except Exception as e:
                statuses[i] = {"state": "failed", "error": str(e)}

        threads = [threading.Thread(target=one, args=(i, c), daemon=True)
                   for i, (_, c) in enumerate(self.agents)]
        for t in threads:
            t.start()
        t0[0] = time.monotonic()
        cpu0 = cpu_times()
        barrier.wait()
        skip: set[int] = set()
        if fault is not None:
            first_chunk.wait(PULL_TIMEOUT_S)
            if fault == "hung":
                os.killpg(self.pods[0].pid, signal.SIGSTOP)
            else:
                self.pods[0].kill9()
            skip.add(0)
        for t in threads:
            t.join(PULL_TIMEOUT_S)
        cpu1 = cpu_times()
        tiers: dict[str, int] = {}
        for st in statuses:
            for k, v in (st.get("bytes_by_tier") or {}).items():
                tiers[k] = tiers.get(k, 0) + int(v)
        done = [t for t in times if not math.isnan(t)]
        errors = [str(st.get("error")) for st in statuses if st.get("state") != "done"]
        res = RunResult(done, self.origin_bytes(), self.pod_bytes(skip), tiers,
                        failed=len(errors), first_error=errors[0] if errors else "",
                        cpu_busy=(cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1]))
        if self.args.verbose:  # why chunks were asked twice: each agent's complaints
            for p, _ in self.agents:
                for ln in p.lines:
                    if "answered" in ln or "hedging" in ln or "is suspected" in ln:
                        print("   ", ln.strip()[:300], flush=True)
        for _, client in self.agents:
            with contextlib.suppress(Exception):
                text = client.metrics()
                res.timeouts += int(metric(text, "bdn_agent_timeout_answers_total"))
                res.uncached += int(metric(text, "bdn_agent_uncached_answers_total"))
                res.after_wait += int(metric(text, "bdn_agent_peer_uploads_after_wait_total"))
        return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def bound_s(model_bytes: int, n: int, args: argparse.Namespace, sharing: bool) -> float:
    """The least pull time the shaping allows: every agent receives the whole model on
    its link; without sharing the pods' links also carry N copies between them, and the
    store's link one copy."""
    bps = 1_000_000 / 8
    agent = model_bytes / (args.agent_mbit * bps)
    store = model_bytes / (args.store_mbit * bps)
    pods = n * model_bytes / (3 * args.pod_mbit * bps)
    return max(agent, store) if sharing else max(agent, store, pods)


def report(label: str, n: int, res: RunResult, model_bytes: int, bound: float) -> None:
    pods = res.pod_bytes
    mean = statistics.mean(pods.values()) if pods else 0.0
    balance = (max(pods.values()) / mean) if mean else math.nan
    tiers = ", ".join(f"{k} {v / MiB:.0f}" for k, v in res.tiers.items())
    print(f"  {label:<14} N={n:<3} p50 {pct(res.times_s, 0.5):7.2f} s  p99 "
          f"{pct(res.times_s, 0.99):7.2f} s  max {max(res.times_s, default=math.nan):7.2f} s"
          f"  (bound {bound:6.2f} s)  origin/model {res.origin_bytes / model_bytes:5.2f}"
          f"  pods MiB {[round(v / MiB) for v in pods.values()]} max/mean {balance:4.2f}"
          f"  tiers MiB: {tiers}  timeouts {res.timeouts} uncached {res.uncached}"
          f"  served-while-receiving {res.after_wait}  cpu busy {res.cpu_busy:.0%}"
          + (f"  FAILED {res.failed}: {res.first_error[:300]}" if res.failed else ""),
          flush=True)


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGTERM ends the bench like Ctrl-C, so teardown runs."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", default="1,4,8,16,32")
    ap.add_argument("--model-mib", type=int, default=512)
    ap.add_argument("--piece-mib", type=int, default=8)
    ap.add_argument("--store-mbit", type=int, default=2000)
    ap.add_argument("--pod-mbit", type=int, default=1000)
    ap.add_argument("--agent-mbit", type=int, default=1000)
    ap.add_argument("--agent-connections", type=int, default=0,
                    help="each agent's --max-connections (default: the agent's own)")
    ap.add_argument("--warm-pods", action="store_true",
                    help="each pod prefetches the model (as on deploy) before the pulls")
    ap.add_argument("--pod-fill-threads", type=int, default=0,
                    help="each pod's --fill-threads: store reads at once (default: the "
                         "pod's own)")
    ap.add_argument("--agent-uploads", type=int, default=0,
                    help="each agent's --peer-max-uploads (default: the agent's own)")
    ap.add_argument("--queue-ms", type=int, default=TBF_LATENCY_MS,
                    help="each link's tbf queue, in milliseconds at its rate")
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "fleet"))
    ap.add_argument("--no-faults", action="store_true", help="skip the hung/killed runs")
    ap.add_argument("--sharing-only", action="store_true",
                    help="skip the runs without node-to-node sharing")
    ap.add_argument("--faults-only", action="store_true",
                    help="only the hung/killed runs (at the largest N)")
    ap.add_argument("--verbose", action="store_true",
                    help="also print every agent's warnings about answers and hedges")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        print("bench/fleet.py needs root and iproute2 (ip, tc): apt-get install -y iproute2",
              file=sys.stderr)
        return 2
    ns_list = [int(x) for x in args.agents.split(",") if x.strip()]
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # The source and the store (2 × the model) unless kept from an earlier invocation,
    # plus the largest run; each run's folder is removed before the next starts.
    model_est = args.model_mib * MiB
    kept = sum(p.stat().st_size for d in (work / "src", work / "store") if d.exists()
               for p in d.rglob("*") if p.is_file())
    need = max(0, 2 * model_est - kept) + run_bytes_needed(model_est, max(ns_list))
    refusal = check_free_space(work, need, f"the model ({args.model_mib} MiB, mirrored) "
                               f"and one run of N = {max(ns_list)}")
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    make_model(work / "src", args.model_mib, args.piece_mib)
    store_dir = work / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    bs = mirror(store_dir, work / "src", args.piece_mib)
    _, manifest = bs.resolve(REF)
    model_bytes = manifest.unique_size
    objects = manifest_objects(manifest)
    placed = place([f"http://{ip}:{POD_PORT}" for ip in POD_IPS], objects).bytes_by_peer(
        objects)
    print(f"model {model_bytes / MiB:.0f} MiB in {len(objects)} chunks; links (Mbit/s): "
          f"store {args.store_mbit}, pods {args.pod_mbit}, agents {args.agent_mbit}; "
          f"placement max/mean {max(placed.values()) * 3 / model_bytes:.3f}", flush=True)
    prefix = f"bdnf{os.getpid() % 100000}"
    with interrupts_raise(), Net(prefix, args.queue_ms) as net:
        fleet = Fleet(args, net, work / RUNS_DIR)
        try:
            fleet.start_store(store_dir)
            fleet.add_namespaces(max(ns_list))
            for n in [] if args.faults_only else ns_list:
                for sharing in (True,) if args.sharing_only else (False, True):
                    label = "sharing" if sharing else "no sharing"
                    mnt = fleet.start(n, f"n{n}-{'s' if sharing else 'ns'}", sharing)
                    if args.warm_pods:
                        fleet.warm_pods()
                    before = fleet.origin_bytes()
                    res = fleet.pull_all(mnt)
                    res.origin_bytes -= before
                    report(label, n, res, model_bytes, bound_s(model_bytes, n, args, sharing))
                    fleet.stop()
                    fleet.discard_run()
            if not args.no_faults:
                n = max(ns_list)
                for fault in ("killed", "hung"):
                    mnt = fleet.start(n, f"fault-{fault}", True)
                    if args.warm_pods:
                        fleet.warm_pods()
                    before = fleet.origin_bytes()
                    res = fleet.pull_all(mnt, fault)
                    res.origin_bytes -= before
                    report(f"pod {fault}", n, res, model_bytes,
                           bound_s(model_bytes, n, args, True))
                    fleet.stop()
                    fleet.discard_run()
        finally:
            fleet.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
