"""A stand-in kubelet for tests: GPU nodes whose pods are real local processes.

``python tests/kube_standin.py --kubeconfig FILE --node gpu-0 --node gpu-1 ...`` registers
the nodes (capacity ``nvidia.com/gpu`` and the labels and taints given), keeps their Ready
condition fresh, and for every pod the scheduler binds to one of them:

- gives the pod its own loopback address (``--ip-prefix 127.A.B`` → ``127.A.B.N``: each is
  a distinct address on Linux, so pods can share a containerPort);
- runs its init containers to completion, then starts its first container's command as
  a local process in its own session, with the container's environment (``$(VAR)``
  references expanded as the kubelet does, ``fieldRef`` for the pod's IP, name,
  namespace and node, ``secretKeyRef``/``envFrom`` read from the API). A container
  without ``command`` runs ``--entrypoint`` (the image's entrypoint: ``bdn`` here) with
  its ``args``. hostPath volumes are this machine's paths, as on a real node;
- reports Running with the pod IP, then Ready from the process's readiness probe
  (``httpGet`` on the pod IP), Failed when the process exits;
- on deletion stops the process (SIGTERM, then SIGKILL after the grace period) and
  removes the pod, as the kubelet finishes a graceful delete.

Pods matching a ``--simulate KEY=VALUE`` label run nothing: they are reported Running
and Ready at once (for pods such as the node agent, whose hostPaths are real system
folders a test must not write).

It prints ``KUBE_STANDIN_READY`` once its nodes are Ready, and ``pod NS/NAME started``,
``ready``, ``exited``, ``stopped`` lines tests can wait on. A pod deleted or changed while
it is being updated (404/409) is not an error: the next event says what it became.
It is a test double of the kubelet, not of anything bdn ships.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

HEARTBEAT_S = 5.0
WATCH_TIMEOUT_S = 30
PROBE_TIMEOUT_S = 2.0
READY_LINE = "KUBE_STANDIN_READY"
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def say(line: str) -> None:
    print(line, flush=True)


def expand(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` → value (unknown references stay as written, like the kubelet)."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    ip: str
    container: str = ""
    proc: subprocess.Popen[bytes] | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Standin:
    def __init__(self, args: argparse.Namespace) -> None:
        config.load_kube_config(args.kubeconfig)
        self.core = client.CoreV1Api()
        self.args = args
        self.nodes: list[str] = args.node
        self.runs: dict[str, PodRun] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.next_ip = 2
        self.entrypoint = shlex.split(args.entrypoint)

    # -- nodes ------------------------------------------------------------------------

    def node_status(self) -> dict[str, Any]:
        a = self.args
        capacity = {"cpu": a.cpu, "memory": a.memory, "pods": "110",
                    "nvidia.com/gpu": str(a.gpus)}
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "stand-in kubelet", "lastHeartbeatTime": now(),
                 "lastTransitionTime": now()}
        return {"capacity": capacity, "allocatable": capacity, "conditions": [ready],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                              {"type": "Hostname", "address": "localhost"}],
                "nodeInfo": {"kubeletVersion": "v1.20.2", "containerRuntimeVersion":
                             "standin://1", "architecture": "amd64",
                             "operatingSystem": "linux", "machineID": "", "systemUUID": "",
                             "bootID": "", "kernelVersion": "", "osImage": "",
                             "kubeProxyVersion": ""}}

    def register(self) -> None:
        labels = dict(kv.split("=", 1) for kv in self.args.label)
        taints = []
        for t in self.args.taint:
            kv, _, effect = t.partition(":")
            key, _, value = kv.partition("=")
            taints.append({"key": key, "value": value or None, "effect": effect})
        for name in self.nodes:
            body = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "labels": {
                        **labels, "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64"}},
                    "spec": {"taints": taints}}
            with contextlib.suppress(ApiException):
                self.core.create_node(body)
            self.core.patch_node_status(name, {"status": self.node_status()})

    def heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            for name in self.nodes:
                try:
                    self.core.patch_node_status(name, {"status": self.node_status()})
                except Exception as e:  # the next beat tries again
                    say(f"heartbeat of {name} failed: {e}")

    # -- pods -------------------------------------------------------------------------

    def watch_pods(self) -> None:
        rv = ""
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(self.core.list_pod_for_all_namespaces,
                                   resource_version=rv or None,
                                   timeout_seconds=WATCH_TIMEOUT_S):
                    pod = ev["object"]
                    rv = pod.metadata.resource_version
                    self.on_pod(ev["type"], pod)
                    if self.stop.is_set():
                        break
            except ApiException as e:
                if e.status == 410:  # history gone: list again from now
                    rv = ""
                    continue
                if not self.stop.is_set():
                    say(f"pod watch failed: {e}")
                    self.stop.wait(1.0)
            except Exception as e:
                if not self.stop.is_set():
                    say(f"pod watch failed: {e!r}")
                    self.stop.wait(1.0)

    def on_pod(self, kind: str, pod: Any) -> None:
        if pod.spec.node_name not in self.nodes:
            return
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        with self.lock:
            run = self.runs.get(key)
            if run is not None and run.uid != pod.metadata.uid:
                run = None  # same name, new pod: the old run stops on its own event
            gone = kind == "DELETED" or pod.metadata.deletion_timestamp is not None
            if gone:
                if run is not None and not run.stopping.is_set():
                    run.stopping.set()
                    grace = pod.spec.termination_grace_period_seconds
                    threading.Thread(target=self.finish, args=(run, grace, kind),
                                     daemon=True).start()
                elif run is None and kind != "DELETED":
                    self.delete_now(pod.metadata.namespace, pod.metadata.name,
                                    pod.metadata.uid)
                return
            if run is not None or pod.status.phase in ("Succeeded", "Failed"):
                return
            ip = f"{self.args.ip_prefix}.{self.next_ip}"
            self.next_ip += 1
            run = PodRun(pod.metadata.namespace, pod.metadata.name, pod.metadata.uid, ip)
            self.runs[key] = run
        run.thread = threading.Thread(target=self.run_pod, args=(run, pod), daemon=True)
        run.thread.start()

    def environment(self, run: PodRun, pod: Any, container: Any) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("KUBECONFIG", None)
        fields = {"status.podIP": run.ip, "metadata.name": run.name,
                  "metadata.namespace": run.namespace, "spec.nodeName": pod.spec.node_name,
                  "status.hostIP": "127.0.0.1"}
        for src in container.env_from or []:
            if src.secret_ref is not None:
                data = self.secret(run.namespace, src.secret_ref.name,
                                   bool(src.secret_ref.optional))
                env.update({(src.prefix or "") + k: v for k, v in data.items()})
        for var in container.env or []:
            if var.value is not None:
                env[var.name] = expand(var.value, env)
            elif var.value_from is not None and var.value_from.field_ref is not None:
                env[var.name] = fields.get(var.value_from.field_ref.field_path, "")
            elif var.value_from is not None and var.value_from.secret_key_ref is not None:
                ref = var.value_from.secret_key_ref
                data = self.secret(run.namespace, ref.name, bool(ref.optional))
                if ref.key in data:
                    env[var.name] = data[ref.key]
        return env

    def secret(self, namespace: str, name: str, optional: bool) -> dict[str, str]:
        import base64
        try:
            s = self.core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404 and optional:
                return {}
            raise
        return {k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()}

    def argv(self, container: Any, env: dict[str, str]) -> list[str]:
        command = list(container.command or []) or list(self.entrypoint)
        return [expand(a, env) for a in [*command, *(container.args or [])]]

    def spawn(self, run: PodRun, argv: list[str], env: dict[str, str],
              label: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def forward() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                say(f"[{run.namespace}/{run.name}/{label}] "
                    f"{raw.decode(errors='replace').rstrip()}")

        threading.Thread(target=forward, daemon=True).start()
        return proc

    def simulated(self, pod: Any) -> bool:
        labels = pod.metadata.labels or {}
        return any(labels.get(k) == v for k, v in
                   (kv.split("=", 1) for kv in self.args.simulate))

    def run_pod(self, run: PodRun, pod: Any) -> None:
        key = f"{run.namespace}/{run.name}"
        if self.simulated(pod):
            run.container = pod.spec.containers[0].name
            self.set_status(run, "Running", ready=True)
            say(f"pod {key} simulated ip {run.ip}")
            return
        try:
            for init in pod.spec.init_containers or []:
                env = self.environment(run, pod, init)
                proc = self.spawn(run, self.argv(init, env), env, init.name)
                run.proc = proc
                if proc.wait() != 0:
                    say(f"pod {key} init container {init.name} failed")
                    self.set_status(run, "Failed", ready=False, exit_code=proc.returncode)
                    return
                if run.stopping.is_set():
                    return
            container = pod.spec.containers[0]
            run.container = container.name
            env = self.environment(run, pod, container)
            with self.lock:
                if run.stopping.is_set():
                    return
                run.proc = self.spawn(run, self.argv(container, env), env, container.name)
            say(f"pod {key} started pid {run.proc.pid} ip {run.ip}")
            self.set_status(run, "Running", ready=False)
            self.probe(run, container)
        except Exception as e:
            say(f"pod {key} could not run: {e!r}")
            self.set_status(run, "Failed", ready=False, exit_code=-1)

    def probe(self, run: PodRun, container: Any) -> None:
        """Report Ready from the readiness probe, as often as it asks; Failed on exit."""
        key = f"{run.namespace}/{run.name}"
        probe = container.readiness_probe
        url = None
        period = 1.0
        if probe is not None and probe.http_get is not None:
            port = probe.http_get.port
            if isinstance(port, str) and not port.isdigit():
                port = next(p.container_port for p in container.ports or [] if p.name == port)
            url = f"http://{run.ip}:{port}{probe.http_get.path or '/'}"
            period = float(probe.period_seconds or 10)
        ready = False
        assert run.proc is not None
        while not run.stopping.is_set():
            if run.proc.poll() is not None:
                if not run.stopping.is_set():
                    say(f"pod {key} exited {run.proc.returncode}")
                    self.set_status(run, "Failed", ready=False, exit_code=run.proc.returncode)
                return
            ok = True
            if url is not None:
                try:
                    with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as resp:
                        ok = resp.status == 200
                except (urllib.error.URLError, OSError):
                    ok = False
            if ok != ready:
                ready = ok
                self.set_status(run, "Running", ready=ready)
                say(f"pod {key} {'ready' if ready else 'unready'}")
            # Fast until first ready (a cold start), then at the probe's own period.
            run.stopping.wait(0.1 if not ready else period)

    def set_status(self, run: PodRun, phase: str, *, ready: bool,
                   exit_code: int | None = None) -> None:
        flag = "True" if ready else "False"
        conditions = [{"type": t, "status": s, "lastTransitionTime": now()} for t, s in (
            ("Initialized", "True"), ("ContainersReady", flag), ("Ready", flag),
            ("PodScheduled", "True"))]
        state: dict[str, Any] = {"running": {"startedAt": now()}}
        if exit_code is not None:
            state = {"terminated": {"exitCode": exit_code, "reason": "Error",
                                    "finishedAt": now()}}
        status = {"phase": phase, "podIP": run.ip, "podIPs": [{"ip": run.ip}],
                  "hostIP": "127.0.0.1", "startTime": now(), "conditions": conditions,
                  "containerStatuses": [{"name": run.container or "main", "ready": ready,
                                         "restartCount": 0, "image": "standin",
                                         "imageID": "", "state": state}]}
        try:
            self.core.patch_namespaced_pod_status(run.name, run.namespace, {"status": status})
        except ApiException as e:
            if e.status not in (404, 409):  # deleted or changed meanwhile: not an error
                say(f"status of {run.namespace}/{run.name} failed: {e.status}")

    def finish(self, run: PodRun, grace: int | None, kind: str) -> None:
        self.kill(run, float(grace if grace is not None else 30))
        say(f"pod {run.namespace}/{run.name} stopped")
        if kind != "DELETED":
            self.delete_now(run.namespace, run.name, run.uid)
        with self.lock:
            if self.runs.get(f"{run.namespace}/{run.name}") is run:
                del self.runs[f"{run.namespace}/{run.name}"]

    def kill(self, run: PodRun, grace_s: float) -> None:
        proc = run.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def delete_now(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.core.delete_namespaced_pod(
                name, namespace, body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)))
        except ApiException as e:
            if e.status not in (404, 409):
                say(f"delete of {namespace}/{name} failed: {e.status}")

    def shutdown(self) -> None:
        self.stop.set()
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.stopping.set()
            self.kill(run, 2.0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", action="append", required=True)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cpu", default="64")
    parser.add_argument("--memory", default="512Gi")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--taint", action="append", default=[], metavar="KEY[=VALUE]:EFFECT")
    parser.add_argument("--simulate", action="append", default=[], metavar="KEY=VALUE",
                        help="pods with this label run nothing and are reported Ready")
    parser.add_argument("--ip-prefix", default="127.0.0",
                        help="pods get PREFIX.2, PREFIX.3, ... (three octets)")
    parser.add_argument("--entrypoint", default=f"{shlex.quote(sys.executable)} -m bdn.cli",
                        help="what a container without command runs (the image's entrypoint)")
    args = parser.parse_args()
    standin = Standin(args)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    standin.register()
    threading.Thread(target=standin.heartbeat, daemon=True).start()
    threading.Thread(target=standin.watch_pods, daemon=True).start()
    say(f"{READY_LINE} {','.join(args.node)}")
    done.wait()
    standin.shutdown()
    return 0


if __name__ == "__main__":
    time.tzset()
    sys.exit(main())
