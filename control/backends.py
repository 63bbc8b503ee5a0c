"""Replica backends: how a replica of a deployment is started, found ready, and stopped.

The controller decides *how many* replicas a deployment has; a backend makes one exist.
The interface is deliberately small (start until ready, stop gracefully) so the local
default and a cluster backend are interchangeable:

- :class:`LocalProcessBackend` (default) runs ``bdn serve MODEL_DIR --listen 127.0.0.1:0``
  as a child process in its own session, reads the ``BDN_LISTENING <url>`` line for the
  port it bound, and waits until the model's ``load()`` returned: ``GET /health/ready``
  answers 200, or (sooner) the replica prints ``BDN_READY <url>`` as ``bdn serve`` does.
  It records the cold start (spawn to ready). Stopping sends SIGTERM to the process group,
  then SIGKILL after a grace period. The command is a setting, so tests and operators
  can run a different server that speaks the same contract.
- :class:`KubernetesBackend` is a documented stub: it renders the Deployment and Service
  a replica set would be in a cluster; it does not talk to an API server (there is none
  here), and says so when asked to start a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from bdn.service import LOADED_PREFIX, READY_PREFIX
from control.errors import BackendError, RequestError

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT_S = 600.0
DEFAULT_STOP_GRACE_S = 10.0
# A replica still loading serves nothing: it gets less time to go before SIGKILL.
UNREADY_STOP_GRACE_S = 1.0
PR_SET_PDEATHSIG = 1
# The readiness probe starts fast and backs off: a probe costs the loading replica a
# little CPU, and most replicas (``bdn serve``) announce readiness on stdout anyway.
READY_POLL_FIRST_S = 0.02
READY_POLL_MAX_S = 0.1
READY_PROBE_TIMEOUT_S = 2.0
OUTPUT_TAIL_LINES = 40


@dataclass(frozen=True)
class ReplicaSpec:
    """What to run: one deployment's model folder (at one revision)."""

    model_id: str
    deployment_id: str
    deployment_name: str
    model_dir: str
    revision: int = 1


@dataclass
class Replica:
    """A running replica as the controller and router see it."""

    id: str
    spec: ReplicaSpec
    url: str
    started_at_s: float
    ready_at_s: float
    handle: Any = None
    pid: int | None = None
    ready: bool = False
    in_flight: int = 0
    draining: bool = False
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_TAIL_LINES))

    @property
    def cold_start_s(self) -> float:
        return self.ready_at_s - self.started_at_s


class ReplicaBackend(Protocol):
    """Starts and stops replicas. ``start`` returns only once the replica is ready."""

    name: str

    async def start(self, spec: ReplicaSpec, replica_id: str) -> Replica: ...

    async def stop(self, replica: Replica) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class LocalBackendOptions:
    """Settings of the local-process backend."""

    # argv prefix; the model folder and ``--listen 127.0.0.1:0`` are appended.
    command: tuple[str, ...] = (sys.executable, "-m", "bdn.cli", "serve")
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    listen_host: str = "127.0.0.1"
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.command:
            raise RequestError("must name a program", field="command")
        if self.ready_timeout_s <= 0:
            raise RequestError("must be positive", field="ready_timeout_s")
        if self.stop_grace_s < 0:
            raise RequestError("must not be negative", field="stop_grace_s")


class LocalProcessBackend:
    """Replicas as ``bdn serve`` child processes on free loopback ports."""

    name = "local"

    def __init__(self, options: LocalBackendOptions | None = None) -> None:
        self.options = options or LocalBackendOptions()
        self._session: aiohttp.ClientSession | None = None
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=READY_PROBE_TIMEOUT_S))
        return self._session

    async def start(self, spec: ReplicaSpec, replica_id: str) -> Replica:
        opts = self.options
        argv = [*opts.command, spec.model_dir, "--listen", f"{opts.listen_host}:0"]
        env = dict(os.environ)
        env.update(dict(opts.env))
        env["PYTHONUNBUFFERED"] = "1"
        env["BDN_REPLICA_ID"] = replica_id
        started = time.monotonic()
        log.info("starting replica %s of deployment %s: %s", replica_id,
                 spec.deployment_id, " ".join(argv))
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_die_with_parent)
        self._procs[replica_id] = proc
        output: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
        loop = asyncio.get_running_loop()
        url_found: asyncio.Future[str] = loop.create_future()
        loaded: asyncio.Future[None] = loop.create_future()
        reader = asyncio.create_task(self._drain(proc, replica_id, output, url_found, loaded))
        replica = Replica(id=replica_id, spec=spec, url="", started_at_s=started,
                          ready_at_s=started, handle=(proc, reader), pid=proc.pid,
                          output=output)
        try:
            await asyncio.wait_for(self._wait_ready(proc, url_found, loaded, replica),
                                   timeout=opts.ready_timeout_s)
        except TimeoutError:
            await self.stop(replica)
            raise BackendError(
                f"replica {replica_id} of deployment {spec.deployment_id} was not ready "
                f"within {opts.ready_timeout_s:.0f} s", replica=replica_id) from None
        except BaseException:
            await self.stop(replica)
            raise
        replica.ready_at_s = time.monotonic()
        replica.ready = True
        log.info("replica %s of deployment %s ready at %s after %.2f s", replica_id,
                 spec.deployment_id, replica.url, replica.cold_start_s)
        return replica

    async def _drain(self, proc: asyncio.subprocess.Process, replica_id: str,
                     output: deque[str], url_found: asyncio.Future[str],
                     loaded: asyncio.Future[None]) -> None:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip()
            output.append(line)
            log.debug("replica %s: %s", replica_id, line)
            if not url_found.done() and line.startswith(READY_PREFIX):
                url_found.set_result(line[len(READY_PREFIX):].strip())
            # LOADED_PREFIX comes once load() returned: an event, quicker than a probe.
            elif not loaded.done() and line.startswith(LOADED_PREFIX):
                loaded.set_result(None)
        if not url_found.done():
            url_found.set_exception(EOFError())
        if not loaded.done():
            loaded.cancel()

    def _exited(self, proc: asyncio.subprocess.Process, replica: Replica) -> BackendError:
        tail = "\n".join(list(replica.output)[-10:])
        return BackendError(
            f"replica {replica.id} of deployment {replica.spec.deployment_id} exited with "
            f"status {proc.returncode} before it was ready; last output:\n{tail}",
            replica=replica.id)

    async def _wait_ready(self, proc: asyncio.subprocess.Process,
                          url_found: asyncio.Future[str], loaded: asyncio.Future[None],
                          replica: Replica) -> None:
        try:
            replica.url = await url_found
        except EOFError:
            await proc.wait()
            raise self._exited(proc, replica) from None
        probing = asyncio.ensure_future(self._probe_ready(proc, replica))
        try:
            # Whichever comes first: the replica's own "loaded" line, or a 200 from
            # /health/ready (servers that print no such line).
            await asyncio.wait({probing, loaded}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            probing.cancel()
        if probing.done() and not probing.cancelled() and probing.exception() is not None:
            raise probing.exception()  # type: ignore[misc]
        if not (loaded.done() and not loaded.cancelled()) and not (
                probing.done() and not probing.cancelled()):
            await proc.wait()
            raise self._exited(proc, replica)

    async def _probe_ready(self, proc: asyncio.subprocess.Process, replica: Replica) -> None:
        probe = f"{replica.url}/health/ready"
        session = self._http()
        # A bounded poll on a condition, for replicas that announce nothing when loaded.
        interval = READY_POLL_FIRST_S
        while True:
            if proc.returncode is not None:
                raise self._exited(proc, replica)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(probe) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(interval)
            interval = min(interval * 2, READY_POLL_MAX_S)

    async def stop(self, replica: Replica) -> None:
        proc, reader = replica.handle
        self._procs.pop(replica.id, None)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            grace = self.options.stop_grace_s if replica.ready else min(
                self.options.stop_grace_s, UNREADY_STOP_GRACE_S)
            try:
                await asyncio.wait_for(proc.wait(), timeout=grace)
            except TimeoutError:
                log.warning("replica %s did not stop within %.0f s; killing it", replica.id,
                            grace)
        # Children of the replica live in its session; make sure none is left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(reader, timeout=1.0)

    def alive(self, replica: Replica) -> bool:
        proc, _ = replica.handle
        return proc.returncode is None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _die_with_parent() -> None:
    """In the child, before exec: be killed if the control server dies without stopping us.

    Replicas run in their own session (so one can be stopped with its children), which
    also takes them out of reach of a signal to the server's process group; without this
    a crashed or SIGKILLed server would leave orphaned replicas holding GPUs.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class KubernetesBackendOptions:
    namespace: str = "bdn"
    image: str = "ghcr.io/bdn/bdn:latest"
    port: int = 8080
    gpu_resource: str = "nvidia.com/gpu"
    gpus: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise RequestError("must be 1-65535", field="port")
        if self.gpus < 0:
            raise RequestError("must not be negative", field="gpus")


class KubernetesBackend:
    """A stub: renders a deployment's replicas as a Kubernetes Deployment + Service.

    In a cluster, the controller would apply :meth:`render` with ``replicas`` set to the
    autoscaler's decision and read readiness from the pods' readiness probes (the same
    ``/health/ready``); the router would forward to the Service. No API client is built
    in here; ``start`` says so instead of pretending.
    """

    name = "kubernetes"

    def __init__(self, options: KubernetesBackendOptions | None = None) -> None:
        self.options = options or KubernetesBackendOptions()

    def render(self, spec: ReplicaSpec, replicas: int) -> list[dict[str, Any]]:
        o = self.options
        name = f"bdn-{spec.model_id}-{spec.deployment_id}"
        labels = {"app.kubernetes.io/name": "bdn-replica", "bdn.dev/model": spec.model_id,
                  "bdn.dev/deployment": spec.deployment_id}
        probe = {"httpGet": {"path": "/health/ready", "port": o.port},
                 "periodSeconds": 1, "failureThreshold": 1}
        deployment = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": o.namespace, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": int(DEFAULT_STOP_GRACE_S),
                        "containers": [{
                            "name": "replica", "image": o.image,
                            "args": ["serve", spec.model_dir, "--listen", f"0.0.0.0:{o.port}"],
                            "ports": [{"containerPort": o.port, "name": "http"}],
                            "readinessProbe": probe,
                            "livenessProbe": {"httpGet": {"path": "/health/live",
                                                          "port": o.port}},
                            "resources": {"limits": {o.gpu_resource: o.gpus}} if o.gpus else {},
                            # Weights come through the node agent's socket (DESIGN.md).
                            "volumeMounts": [{"name": "agent", "mountPath": "/run/bdn"}],
                        }],
                        "volumes": [{"name": "agent",
                                     "hostPath": {"path": "/run/bdn", "type": "Directory"}}],
                    },
                },
            },
        }
        service = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": o.namespace, "labels": labels},
            "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]},
        }
        return [deployment, service]

    async def start(self, spec: ReplicaSpec, replica_id: str) -> Replica:
        raise BackendError("the Kubernetes backend only renders manifests "
                           "(KubernetesBackend.render); it cannot start replicas itself",
                           replica=replica_id)

    async def stop(self, replica: Replica) -> None:
        raise BackendError("the Kubernetes backend cannot stop replicas", replica=replica.id)

    async def close(self) -> None:
        return None
