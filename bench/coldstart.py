"""Benchmark: scale-from-zero through the control plane against ``bdn serve`` directly.

Part 1, cold start. The same model folder (safetensors weights loaded by ``bdn serve``'s
streaming loader in ``load()``) is started two ways, alternating in one run so both see
the same machine:

- direct: spawn ``bdn serve MODEL --listen 127.0.0.1:0``, wait for its ``BDN_READY`` line,
  send one predict; timed from spawn to the response;
- control plane: a deployment with ``min_replica: 0`` and no replica; send one predict to
  the router; timed from sending to the response (the router queues the request, the
  autoscaler asks for a replica, the backend spawns ``bdn serve`` and waits until it is
  ready, the request is forwarded).

Medians of ``--runs`` runs each, in alternating order; the ratio control/direct should be
at most 1.2. Between control-plane runs the deployment is deactivated and activated,
which stops its replica at once and leaves it at zero replicas (no waiting out a
scale-down delay).

Part 2, load. ``--concurrency`` clients (200) send predicts in a loop for
``--load-duration-s`` to a deployment with ``max_replica: 4`` and ``concurrency_target:
8`` that starts at zero replicas. Reports errors (goal: none), p50/p99 latency and the
replica count over time as the autoscaler scales up.

Part 3, end to end (``--e2e-mb``, default 1024: a model of at least 1 GiB). The model
folder (weights from a ``file://`` source) is pushed once, untimed, so the store holds
it; then, in one run, alternating, ``--e2e-runs`` times each:

- (a) ``bdn pull CONFIG --standalone`` alone into an empty node cache (store → node);
- (b) ``bdn serve`` with the weights already on local disk, to its first response;
- (c) scale from zero through the control plane with an empty node cache: a fresh
  control server (its embedded agent's node cache empty), ``bdn push`` (untimed; it
  finds everything mirrored), then one predict, timed to its response.

Goal: (c) <= 1.1 x max(a, b): process start, imports and loading hidden under the
transfer. Prints the three medians, the ratio, (c)'s cold-start phases (medians), and
the CPU seconds each case used (all its processes; for (c), those of the control
server, its agent and the replica while the predict was answered). ``--only e2e`` runs
this part alone.

With ``--store-rate RATE`` (bytes/s, e.g. ``300M``) the part runs a second time with the
store behind a link of that rate: the same store folder served over HTTP by
``tests/cache/store_http.py --rate`` and read through it by (a)'s ``bdn pull`` and by
(c)'s node agent alike ((c) then runs ``bdn agent`` itself, with the flags the embedded
one gets but that store URL, and gives the control server ``--agent``; pushes still go
to the folder). On loopback the pull is CPU-bound (hashing and copying at GB/s), so
on a small machine (c)'s pull and ``bdn serve``'s imports compete for the same cores;
in production the pull waits on the network. Both ratios are printed, each against
the (a) and (b) of its own round, and both must meet the goal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bdn.childproc import ChildProcess  # noqa: E402
from cache.cli import parse_bytes  # noqa: E402

STORE_HTTP = ROOT / "tests" / "cache" / "store_http.py"

MiB = 1024**2
TENSOR_ELEMS = 2048 * 2048  # 8 MiB of fp16 per tensor
API_KEY = "bench-" + os.urandom(8).hex()
SAMPLE_INTERVAL_S = 0.5

MODEL_PY = '''
import time


class Model:
    def __init__(self, weights=None, **kwargs):
        self._weights = weights
        self.tensors = {}

    def load(self):
        self.tensors = self._weights.load()

    def predict(self, model_input):
        time.sleep(float(model_input.get("work_ms", 0)) / 1000.0)
        return {"tensors": len(self.tensors)}
'''


def make_model(root: Path, weights_mb: int) -> Path:
    """A model folder whose load() streams ``weights_mb`` of fp16 safetensors."""
    model_dir, weights = root / "model", root / "weights"
    if not (weights / "model.safetensors").exists():
        weights.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        n = max(1, weights_mb * MiB // (TENSOR_ELEMS * 2))
        tensors = {f"layers.{i}.weight": rng.integers(0, 65535, TENSOR_ELEMS, dtype=np.uint16)
                   .view(np.float16).reshape(2048, 2048) for i in range(n)}
        save_file(tensors, str(weights / "model.safetensors"))
    (model_dir / "model").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.yaml").write_text(
        "model_name: coldstart-bench\n"
        "weights:\n"
        f"  - source: file://{weights}\n"
        f"    mount_location: {weights}\n"
        "predict_concurrency: 8\n")
    (model_dir / "model" / "model.py").write_text(MODEL_PY)
    return model_dir


def http(method: str, url: str, body: Any = None, timeout_s: float = 600) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Api-Key {API_KEY}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read() or b"null")


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bdn.cli", *args]


def direct_run(model_dir: Path) -> float:
    """Spawn ``bdn serve``, wait for BDN_READY, first predict: seconds from spawn."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(serve_cmd("serve", str(model_dir), "--listen", "127.0.0.1:0"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            if line.startswith("BDN_LISTENING"):
                url = line.split()[1]
            if line.startswith("BDN_READY"):
                break
        else:
            raise RuntimeError("bdn serve exited before it was ready")
        http("POST", f"{url}/predict", {})
        return time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


class Control:
    """A control server process for the benchmark."""

    def __init__(self, state_dir: Path, store: Path | None = None,
                 agent: str | None = None) -> None:
        env = dict(os.environ, BDN_API_KEY=API_KEY, PYTHONUNBUFFERED="1")
        extra = ["--agent", agent] if agent is not None else []
        self.proc = ChildProcess(
            serve_cmd("control-server", "--listen", "127.0.0.1:0", "--state-dir",
                      str(state_dir), "--store", str(store or state_dir / "store"), *extra),
            env=env, cwd=ROOT)
        assert self.proc.url is not None
        self.url = self.proc.url

    def stop(self) -> None:
        self.proc.stop(60)

    def push(self, model_dir: Path, model_name: str,
             settings: dict[str, int]) -> tuple[str, str]:
        model = http("POST", f"{self.url}/v1/models", {"name": model_name})
        dep = http("POST", f"{self.url}/v1/models/{model['id']}/deployments",
                   {"model_dir": str(model_dir), "autoscaling_settings": settings})
        return model["id"], dep["id"]

    def deployment(self, model_id: str, dep_id: str) -> dict[str, Any]:
        return dict(http("GET", f"{self.url}/v1/models/{model_id}/deployments/{dep_id}"))

    def reset_to_zero(self, model_id: str, dep_id: str) -> None:
        base = f"{self.url}/v1/models/{model_id}/deployments/{dep_id}"
        http("POST", f"{base}/deactivate")
        http("POST", f"{base}/activate")
        dep = self.deployment(model_id, dep_id)
        assert dep["status"] == "SCALED_TO_ZERO", dep["status"]
        # The old replica must have exited, not be tearing down alongside the next cold
        # start (the direct runs wait for their process to exit, too).
        while dep["stopping_replica_count"]:
            time.sleep(0.01)
            dep = self.deployment(model_id, dep_id)


def cold_start_part(args: argparse.Namespace, model_dir: Path, ctl: Control) -> dict[str, Any]:
    model_id, dep_id = ctl.push(model_dir, "coldstart", {"min_replica": 0, "max_replica": 1})
    predict = f"{ctl.url}/models/{model_id}/deployment/{dep_id}/predict"
    direct_run(model_dir)  # warm the page cache and Python's bytecode cache, untimed
    direct: list[float] = []
    control: list[float] = []
    overhead: list[float] = []

    def via_control() -> float:
        ctl.reset_to_zero(model_id, dep_id)
        t0 = time.perf_counter()
        http("POST", predict, {})
        return time.perf_counter() - t0

    for i in range(args.runs):
        # Alternate which goes first, so a drift in the machine's load favours neither.
        if i % 2 == 0:
            direct.append(direct_run(model_dir))
            control.append(via_control())
        else:
            control.append(via_control())
            direct.append(direct_run(model_dir))
        spawn_to_ready = ctl.deployment(model_id, dep_id)["cold_start_seconds"][-1]
        overhead.append(control[-1] - spawn_to_ready)
        print(f"  run {i + 1}/{args.runs}: direct {direct[-1]:.3f} s, "
              f"scale from zero {control[-1]:.3f} s (replica spawn to ready "
              f"{spawn_to_ready:.3f} s)", flush=True)
    md, mc = statistics.median(direct), statistics.median(control)
    ratio = mc / md
    print(f"cold start to first response, median of {args.runs}: bdn serve directly "
          f"{md:.3f} s, control plane from zero {mc:.3f} s, ratio {ratio:.3f}x "
          f"(goal <= 1.2x: {'met' if ratio <= 1.2 else 'NOT met'})")
    print(f"control plane's own share (first response minus the replica's spawn-to-ready), "
          f"median: {statistics.median(overhead) * 1000:.0f} ms")
    return {"direct_s": direct, "control_s": control, "overhead_s": overhead,
            "median_direct_s": md,
            "median_control_s": mc, "ratio": ratio}


async def load_part(args: argparse.Namespace, model_dir: Path, ctl: Control) -> dict[str, Any]:
    import aiohttp

    model_id, dep_id = ctl.push(model_dir, "load", {
        "min_replica": 0, "max_replica": 4, "concurrency_target": 8,
        "autoscaling_window": 10, "scale_down_delay": 60})
    predict = f"{ctl.url}/models/{model_id}/deployment/{dep_id}/predict"
    detail = f"{ctl.url}/v1/models/{model_id}/deployments/{dep_id}"
    headers = {"Authorization": f"Api-Key {API_KEY}"}
    latencies: list[float] = []
    sent_at: list[float] = []
    errors: dict[str, int] = {}
    timeline: list[tuple[float, int, int, int, int]] = []
    t_start = time.perf_counter()
    deadline = t_start + args.load_duration_s
    body = {"work_ms": args.work_ms}

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                async with session.post(predict, json=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
                        continue
            except aiohttp.ClientError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - t0)
            sent_at.append(t0 - t_start)

    async def sampler(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            async with session.get(detail, headers=headers) as resp:
                d = await resp.json()
            timeline.append((time.perf_counter() - t_start, d["active_replica_count"],
                             d["starting_replica_count"], d["desired_replica_count"],
                             d["in_flight_requests"]))
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(sampler(session),
                             *(client(session) for _ in range(args.concurrency)))
    n = len(latencies)
    p50, p99 = percentiles(latencies)
    # Steady state: requests sent once every replica was ready (no cold start inside).
    all_ready = next((t for t, ready, *_ in timeline if ready == 4), None)
    steady = [lat for lat, t in zip(latencies, sent_at, strict=True)
              if all_ready is not None and t >= all_ready]
    s50, s99 = percentiles(steady)
    print(f"load: {args.concurrency} concurrent clients for {args.load_duration_s:.0f} s, "
          f"max_replica 4, concurrency_target 8, from zero replicas")
    print("  t (s)  ready  starting  desired  in flight")
    for t, ready, starting, desired, in_flight in timeline[::max(1, len(timeline) // 24)]:
        print(f"  {t:5.1f}  {ready:5d}  {starting:8d}  {desired:7d}  {in_flight:9d}")
    print(f"  requests {n}, errors {sum(errors.values())} {errors or ''}, "
          f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"{n / args.load_duration_s:.0f} req/s")
    if all_ready is not None:
        print(f"  once all 4 replicas were ready (t >= {all_ready:.1f} s): {len(steady)} "
              f"requests, p50 {s50 * 1000:.0f} ms, p99 {s99 * 1000:.0f} ms")
    cold = ctl.deployment(model_id, dep_id)["cold_start_seconds"]
    print(f"  replica cold starts (s): {', '.join(f'{c:.2f}' for c in cold)}")
    return {"requests": n, "errors": errors, "p50_s": p50, "p99_s": p99,
            "steady_p50_s": s50, "steady_p99_s": s99,
            "timeline": timeline, "cold_starts_s": cold}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one live process and its live descendants (Linux
    /proc; 0 for a process gone or where there is no /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(process_cpu_s(int(c)) for c in f.read().split())
    except (OSError, ValueError, IndexError):
        pass
    return total


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class StoreLink:
    """The store folder served over HTTP at a capped rate (``store_http.py --rate``)."""

    def __init__(self, store: Path, bytes_per_s: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = ChildProcess(
            [sys.executable, str(STORE_HTTP), str(store), "--listen", "127.0.0.1:0",
             "--rate", str(bytes_per_s)], env=env, cwd=ROOT)
        assert self.proc.url is not None
        self.url = self.proc.url

    def stop(self) -> None:
        self.proc.stop(30)


class Agent:
    """``bdn agent`` as the control server's embedded agent runs it (control.delivery.
    EmbeddedAgent: node cache, socket, store), but reading ``store_url``."""

    def __init__(self, state_dir: Path, store_url: str) -> None:
        cache = state_dir / "agent" / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        self.socket = str(state_dir / "agent" / "agent.sock")
        self.proc = ChildProcess(
            serve_cmd("agent", "--cache-dir", str(cache), "--socket", self.socket,
                      "--store", store_url), cwd=ROOT)

    def stop(self) -> None:
        self.proc.stop(60)


def bdn_push(ctl: Control, model_dir: Path) -> tuple[str, str]:
    env = dict(os.environ, BDN_API_KEY=API_KEY, BDN_CONTROL_URL=ctl.url)
    out = subprocess.run(serve_cmd("push", str(model_dir)), env=env, capture_output=True,
                         text=True, check=True, cwd=ROOT)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return doc["model_id"], doc["deployment_id"]


def pull_run(model_dir: Path, store: str, scratch: Path) -> tuple[float, float]:
    """(a): ``bdn pull`` alone into an empty node cache; seconds from spawn to exit, and
    its CPU seconds."""
    cache, to = scratch / "pull-cache", scratch / "pull-mnt"
    cpu0 = children_cpu_s()
    t0 = time.perf_counter()
    subprocess.run(serve_cmd("pull", str(model_dir / "config.yaml"), "--standalone",
                             "--to", str(to), "--cache-dir", str(cache), "--store", store,
                             "--json"), check=True, capture_output=True, cwd=ROOT)
    took = time.perf_counter() - t0
    cpu = children_cpu_s() - cpu0
    subprocess.run(["rm", "-rf", str(cache), str(to)], check=True)
    return took, cpu


def serve_run(model_dir: Path) -> tuple[float, float]:
    """(b): :func:`direct_run`, and the CPU seconds of its process."""
    cpu0 = children_cpu_s()
    took = direct_run(model_dir)
    return took, children_cpu_s() - cpu0


def control_e2e_run(model_dir: Path, store: Path, scratch: Path, link: StoreLink | None
                    ) -> tuple[float, float, dict[str, Any]]:
    """(c): a fresh control server (empty node cache), push untimed, predict timed.

    With ``link`` the node agent is one of our own reading the store through it (an
    embedded agent reads the control server's store folder). Returns the seconds, the
    CPU seconds of every process of (c) while the predict was answered, and the
    replica's cold-start record.
    """
    state = scratch / "control"
    agent = Agent(state, link.url) if link is not None else None
    try:
        ctl = Control(state, store, f"unix:{agent.socket}" if agent is not None else None)
    except BaseException:
        if agent is not None:
            agent.stop()
        raise

    def cpu_now() -> float:
        return process_cpu_s(ctl.proc.pid) + (process_cpu_s(agent.proc.pid)
                                              if agent is not None else 0.0)
    try:
        model_id, dep_id = bdn_push(ctl, model_dir)
        cpu0 = cpu_now()
        t0 = time.perf_counter()
        http("POST", f"{ctl.url}/models/{model_id}/deployment/{dep_id}/predict", {})
        took = time.perf_counter() - t0
        cpu = cpu_now() - cpu0
        replicas = http("GET", f"{ctl.url}/v1/models/{model_id}/deployments/{dep_id}/"
                        "replicas")["replicas"]
        record = replicas[0]["cold_start"]
    finally:
        ctl.stop()
        if agent is not None:
            agent.stop()
        subprocess.run(["rm", "-rf", str(state)], check=True)
    return took, cpu, record


def e2e_part(args: argparse.Namespace) -> dict[str, Any]:
    root = args.dir / f"e2e-{args.e2e_mb}"
    model_dir = make_model(root, args.e2e_mb)
    store = root / "store"
    scratch = root / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"end to end: {args.e2e_mb} MiB of weights, {args.e2e_runs} runs each, "
          f"{os.cpu_count()} CPUs", flush=True)
    # Mirror once, untimed: every later push and pull finds the weights in the store.
    ctl = Control(scratch / "first", store)
    try:
        bdn_push(ctl, model_dir)
    finally:
        ctl.stop()
        subprocess.run(["rm", "-rf", str(scratch / "first")], check=True)
    direct_run(model_dir)  # warm the page cache and Python's bytecode cache, untimed
    results = {"uncapped": e2e_round(args, model_dir, store, scratch, None)}
    if args.store_rate is not None:
        link = StoreLink(store, args.store_rate)
        try:
            results["capped"] = e2e_round(args, model_dir, store, scratch, link)
        finally:
            link.stop()
        results["store_rate_bytes_per_s"] = args.store_rate
    results["ratio"] = max(r["ratio"] for r in results.values() if isinstance(r, dict))
    return results


def e2e_round(args: argparse.Namespace, model_dir: Path, store: Path, scratch: Path,
              link: StoreLink | None) -> dict[str, Any]:
    """(a), (b), (c) alternating, ``--e2e-runs`` times each; the store is the folder or,
    with ``link``, the folder behind a capped link."""
    where = ("store folder, uncapped" if link is None else
             f"store over HTTP at {args.store_rate / MiB:.0f} MiB/s")
    a: list[float] = []
    b: list[float] = []
    c: list[float] = []
    cpu: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    records: list[dict[str, Any]] = []
    for i in range(args.e2e_runs):
        order = ("a", "b", "c") if i % 2 == 0 else ("c", "b", "a")
        for which in order:
            if which == "a":
                took, used = pull_run(model_dir, link.url if link else str(store), scratch)
                a.append(took)
            elif which == "b":
                took, used = serve_run(model_dir)
                b.append(took)
            else:
                took, used, record = control_e2e_run(model_dir, store, scratch, link)
                c.append(took)
                records.append(record)
            cpu[which].append(used)
        print(f"  {where}, run {i + 1}/{args.e2e_runs}: (a) pull {a[-1]:.3f} s, (b) serve "
              f"from disk {b[-1]:.3f} s, (c) scale from zero {c[-1]:.3f} s", flush=True)
    ma, mb, mc = statistics.median(a), statistics.median(b), statistics.median(c)
    ratio = mc / max(ma, mb)
    phases = {p: statistics.median(r["phases"].get(p, 0.0) for r in records)
              for p in ("slot", "spawn", "weights", "waiting_for_weights", "load",
                        "model_init", "total")}
    tiers = {t: statistics.median(r["bytes_by_tier"].get(t, 0) for r in records)
             for t in ("node", "peer", "cluster", "store")}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"end to end ({where}), medians of {args.e2e_runs}: (a) bdn pull {ma:.3f} s, "
          f"(b) bdn serve from disk {mb:.3f} s, (c) scale from zero {mc:.3f} s; "
          f"(c)/max(a, b) = {ratio:.3f} (goal <= 1.1: {'met' if ratio <= 1.1 else 'NOT met'})")
    print("  (c)'s phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
          + "; bytes by tier: " + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in tiers.items()))
    print(f"  CPU seconds (median, all processes of the case): (a) {mcpu['a']:.2f}, "
          f"(b) {mcpu['b']:.2f}, (c) {mcpu['c']:.2f} (a + b = {mcpu['a'] + mcpu['b']:.2f}; "
          f"on {os.cpu_count()} CPUs (c) needs at least "
          f"{mcpu['c'] / (os.cpu_count() or 1):.2f} s)", flush=True)
    return {"pull_s": a, "serve_s": b, "control_s": c, "cpu_s": cpu, "median_pull_s": ma,
            "median_serve_s": mb, "median_control_s": mc, "ratio": ratio,
            "phases": phases, "bytes_by_tier": tiers}


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 (nearest rank) in seconds; NaN for no values."""
    if not values:
        return float("nan"), float("nan")
    v = sorted(values)
    return v[len(v) // 2], v[min(len(v) - 1, int(len(v) * 0.99))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--weights-mb", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--load-duration-s", type=float, default=20.0)
    ap.add_argument("--work-ms", type=float, default=20.0,
                    help="time each predict spends (sleeping) in the model")
    ap.add_argument("--dir", type=Path, default=ROOT / ".bench" / "coldstart")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--e2e-mb", type=int, default=1024,
                    help="weights of the end-to-end part (default 1024: at least 1 GiB)")
    ap.add_argument("--e2e-runs", type=int, default=3)
    ap.add_argument("--store-rate", type=parse_bytes, default=None, metavar="BYTES_PER_S",
                    help="also run the end-to-end part with the store behind a link of "
                         "this rate, e.g. 300M (bytes/s), for (a) and (c) alike")
    ap.add_argument("--only", choices=("cold", "load", "e2e"), default=None,
                    help="run one part alone")
    args = ap.parse_args()
    if args.store_rate is not None and args.store_rate <= 0:
        ap.error("--store-rate must be a positive number of bytes per second")
    results: dict[str, Any] = {}
    if args.only in (None, "cold", "load"):
        model_dir = make_model(args.dir, args.weights_mb)
        print(f"model: {args.weights_mb} MiB of fp16 safetensors loaded in load(); "
              f"{os.cpu_count()} CPUs", flush=True)
        with tempfile.TemporaryDirectory(prefix="bdn-bench-control-") as state:
            ctl = Control(Path(state))
            try:
                if args.only in (None, "cold"):
                    results["cold_start"] = cold_start_part(args, model_dir, ctl)
                if args.only in (None, "load") and not args.skip_load:
                    results["load"] = asyncio.run(load_part(args, model_dir, ctl))
            finally:
                ctl.stop()
    if args.only in (None, "e2e"):
        results["e2e"] = e2e_part(args)
    args.dir.mkdir(parents=True, exist_ok=True)
    (args.dir / "results.json").write_text(json.dumps(results, indent=2))
    ok = (results.get("cold_start", {}).get("ratio", 0) <= 1.2
          and not results.get("load", {}).get("errors")
          and results.get("e2e", {}).get("ratio", 0) <= 1.1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
