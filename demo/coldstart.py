"""The cold-start half of ``make demo`` (see demo/__main__.py): real services on loopback.

A cluster cache server and a node agent start as processes; the agent pulls the base
model through the cache into a read-only mount while ``bdn serve`` already loads tensors
from it (the agent's readiness events tell the loader which bytes are verified). The
replica answers a prediction; then the fine-tune is pulled to show how little crosses
the network when the node already holds the base. Every process is stopped by PID.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bdn.childproc import ChildProcess, ServiceStartError
from bdn.httpclient import HttpClient, split_url
from bdn.progress import human_bytes, human_rate
from bdn.service import LOADED_PREFIX, READY_PREFIX

READY_TIMEOUT_S = 180.0


def start(args: list[str], ready_prefix: str = READY_PREFIX) -> ChildProcess:
    """``bdn ARGS`` as a child process, returned once it printed ``ready_prefix``."""
    try:
        return ChildProcess([sys.executable, "-m", "bdn.cli", *args],
                            ready_prefix=ready_prefix, timeout_s=READY_TIMEOUT_S)
    except ServiceStartError as e:
        raise SystemExit(f"bdn {args[0]} did not start: {e}") from None


def http_json(url: str, body: Any | None = None) -> Any:
    base, target = split_url(url)
    with HttpClient(base, timeout_s=60) as http:
        return http.request("GET" if body is None else "POST", target,
                            json_body=body).json()


def http_text(url: str) -> str:
    base, target = split_url(url)
    with HttpClient(base, timeout_s=30) as http:
        return http.request("GET", target).body.decode()


def metric(text: str, name: str, labels: str = "") -> float:
    pat = re.compile(rf"^{re.escape(name)}{re.escape(labels)}\s+([0-9.eE+-]+)$", re.M)
    m = pat.search(text)
    return float(m.group(1)) if m else float("nan")


def summarize(answer: Any) -> str:
    """Shapes for nested lists (embeddings), values for the rest."""
    if not isinstance(answer, dict):
        return json.dumps(answer)[:200]
    parts = []
    for k, v in answer.items():
        if isinstance(v, list) and v and isinstance(v[0], list):
            parts.append(f"{k}: {len(v)}×{len(v[0])}")
        elif isinstance(v, list) and all(isinstance(x, float) for x in v):
            parts.append(f"{k}: [{', '.join(f'{x:.3f}' for x in v)}]")
        else:
            parts.append(f"{k}: {json.dumps(v)[:80]}")
    return "; ".join(parts)


def tiers(status: dict[str, Any]) -> str:
    t = status.get("bytes_by_tier", {})
    return ", ".join(f"{k} {human_bytes(t.get(k, 0))}" for k in ("node", "cluster", "store"))


def run(workdir: Path, store: str, base_ref: str, tuned_ref: str, example: Path) -> int:
    """Cache, agent and ``bdn serve`` of the ``example`` folder (demo/example.py's copy)."""
    from agent.client import AgentClient

    for sub in ("cache", "node", "mnt"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    sock = str((workdir / "agent.sock").resolve())
    procs: list[ChildProcess] = []
    try:
        print("\n== start a cluster cache and a node agent (loopback)")
        cache = start(["cache-server", "--store", store, "--dir", str(workdir / "cache"),
                       "--budget-bytes", "2G", "--listen", "127.0.0.1:0"])
        procs.append(cache)
        agent = start(["agent", "--cache-dir", str(workdir / "node"), "--budget-bytes", "4G",
                       "--peers", cache.url, "--store", store, "--socket", sock])
        procs.append(agent)
        print(f"   cache {cache.url}, agent unix:{sock}")

        print(f"\n== cold-start a replica of {base_ref} (bdn serve {example.name})")
        client = AgentClient(sock)
        mount = (workdir / "mnt" / "base").resolve()
        t0 = time.perf_counter()
        pull = client.start_pull(ref=base_ref, mount=str(mount))
        serve = start(["serve", str(example), "--weights-dir", str(mount), "--pull-events",
                       client.events_url(pull["id"]), "--listen", "127.0.0.1:0"], LOADED_PREFIX)
        procs.append(serve)
        t_ready = time.perf_counter() - t0
        status = client.wait(pull["id"])
        sample = {"sentences": ["A cat sits on the mat.", "A dog sleeps in the sun."],
                  "query": "Where is the cat?"}
        t1 = time.perf_counter()
        answer = http_json(serve.url + "/predict", sample)
        t_predict = time.perf_counter() - t1
        text = http_text(serve.url + "/metrics")

        def phase_s(name: str) -> float:
            return metric(text, "bdn_cold_start_phase_seconds_sum", "{phase=" + f'"{name}"' + "}")

        print(f"   weights pulled: {status['files_done']} files, "
              f"{human_bytes(status['bytes_total'])} at "
              f"{human_rate(status.get('throughput_bps', 0))} — bytes by tier: "
              f"{tiers(status)}")
        print(f"   replica ready {t_ready:.2f} s after the pull started "
              f"(process start and imports included); the server's own phases:")
        print(f"     waiting for weights {phase_s('waiting_for_weights'):.3f} s, loading to "
              f"device {phase_s('loading_to_device'):.3f} s, model init "
              f"{phase_s('model_init'):.3f} s")
        print(f"   first prediction in {t_predict * 1000:.0f} ms: {summarize(answer)}")

        print(f"\n== pull the fine-tune {tuned_ref} onto the same node")
        t0 = time.perf_counter()
        tuned = client.start_pull(ref=tuned_ref, mount=str(workdir / "mnt" / "tuned"))
        st = client.wait(tuned["id"])
        print(f"   {human_bytes(st['bytes_total'])} in {time.perf_counter() - t0:.2f} s — "
              f"bytes by tier: {tiers(st)}")
        by = st.get("bytes_by_tier", {})
        print(f"   crossed the network: {human_bytes(by.get('cluster', 0) + by.get('store', 0))}"
              f"; copied on the node: {human_bytes(by.get('node', 0))}")
        ctext = http_text(cache.url + "/metrics")
        filled = metric(ctext, "bdn_cache_bytes_filled_total")
        served = metric(ctext, "bdn_cache_bytes_served_total")
        print(f"   cluster cache: filled {human_bytes(filled)} from the store, served "
              f"{human_bytes(served)} to the node")
    finally:
        for p in reversed(procs):
            p.stop()
    print("\nall services stopped. Try: bdn manifest show demo/minilm:finetune "
          f"--base {base_ref} --store {store}")
    return 0


DEMO_API_KEY = "demo-key-0123456789"
CONTROL_WAIT_S = 180.0
CONTROL_POLL_S = 0.1


def describe_start(replica: dict[str, Any]) -> str:
    cs = replica.get("cold_start") or {}
    phases = cs.get("phases", {})
    order = ("weights", "load", "model_init", "total")
    shown = ", ".join(f"{p} {phases[p]:.2f} s" for p in order if p in phases)
    by = cs.get("bytes_by_tier", {})
    moved = ", ".join(f"{t} {human_bytes(by.get(t, 0))}" for t in ("node", "cluster", "store"))
    return f"{shown} — weight bytes by tier: {moved}"


def run_control(workdir: Path, store: str, model_src: Path, example: Path) -> int:
    """The control-plane act: push, predict from zero, a second replica, back to zero."""
    import os
    import subprocess

    from control.client import ControlClient

    state = (workdir / "control").resolve()
    shutil.rmtree(state, ignore_errors=True)
    folder = workdir / "push-minilm"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(example, folder, ignore=shutil.ignore_patterns("__pycache__"))
    # The same config, its weights read from the model the first act mirrored: the push
    # finds every file already in the store by its source fingerprint.
    config = (example / "config.yaml").read_text().replace(
        "hf://sentence-transformers/all-MiniLM-L6-v2@main", f"file://{model_src}")
    (folder / "config.yaml").write_text(config)
    env = {"BDN_API_KEY": DEMO_API_KEY}
    print("\n== the control plane: bdn control-server (embedded node agent, same store)")
    server = ChildProcess([sys.executable, "-m", "bdn.cli", "control-server", "--listen",
                           "127.0.0.1:0", "--state-dir", str(state), "--store", store,
                           "--tick-interval-s", "0.1", "--time-scale", "20"],
                          env=env, timeout_s=READY_TIMEOUT_S)
    try:
        assert server.url is not None
        client = ControlClient(server.url, DEMO_API_KEY)
        print(f"   {server.url}; bdn push {folder}")
        pushed = subprocess.run(
            [sys.executable, "-m", "bdn.cli", "push", str(folder)], capture_output=True,
            text=True, env={**os.environ, **env, "BDN_CONTROL_URL": server.url,
                            "COLUMNS": "120"})
        if pushed.returncode != 0:
            raise SystemExit(f"bdn push failed:\n{pushed.stderr}")
        for line in pushed.stderr.strip().splitlines():
            print(f"   | {line}")
        out = json.loads(pushed.stdout.strip().splitlines()[-1])
        model_id, dep_id = out["model_id"], out["deployment_id"]
        base = f"/v1/models/{model_id}/deployments/{dep_id}"

        print("\n== the first predict cold-starts a replica from an empty node cache")
        sample = {"sentences": ["A cat sits on the mat.", "A dog sleeps in the sun."],
                  "query": "Where is the cat?"}
        t0 = time.perf_counter()
        answer = client.request("POST", f"/models/{model_id}/deployment/{dep_id}/predict",
                                sample, timeout_s=CONTROL_WAIT_S)
        print(f"   answered in {time.perf_counter() - t0:.2f} s from zero replicas: "
              f"{summarize(answer)}")
        [first] = client.request("GET", base + "/replicas")["replicas"]
        print(f"   replica {first['id']}: {describe_start(first)}")

        print("\n== a second replica on the same node starts from the node cache")
        client.request("PATCH", base + "/autoscaling_settings",
                       {"min_replica": 2, "max_replica": 2})
        second = wait_replicas(client, base, lambda rs: len(
            [r for r in rs if r["state"] == "ready"]) == 2)
        other = next(r for r in second if r["id"] != first["id"])
        print(f"   replica {other['id']}: {describe_start(other)}")

        print("\n== scale back to zero")
        client.request("PATCH", base + "/autoscaling_settings",
                       {"min_replica": 0, "max_replica": 1, "scale_down_delay": 0,
                        "autoscaling_window": 10})
        wait_replicas(client, base, lambda rs: not rs)
        dep = client.request("GET", base)
        print(f"   status {dep['status']}; the node cache keeps the weights for the next "
              "cold start")
    finally:
        server.stop()
    return 0


def wait_replicas(client: Any, base: str, done: Any) -> list[dict[str, Any]]:
    """A bounded poll of the API (a demo watching a state change, not a test)."""
    deadline = time.monotonic() + CONTROL_WAIT_S
    while time.monotonic() < deadline:
        replicas = client.request("GET", base + "/replicas")["replicas"]
        if done(replicas):
            return list(replicas)
        time.sleep(CONTROL_POLL_S)
    raise SystemExit(f"the control plane did not get there within {CONTROL_WAIT_S:.0f} s")
