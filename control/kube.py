"""The Kubernetes replica backend: one apps/v1 Deployment per bdn deployment.

It keeps the declarative backend protocol of :mod:`control.backends` (``apply`` a
desired replica count, ``observe`` and ``subscribe`` to what runs, ``remove``,
``close``), against a real API server:

- **One object per deployment, stable name and labels.** ``bdn-<model>-<deployment>``
  with ``app.kubernetes.io/*`` labels and ``bdn.dev/model``/``bdn.dev/deployment``; the
  selector is the deployment's label alone, so a new revision rolls the same object (the
  pod template carries ``bdn.dev/revision``). ``apply`` writes the whole object (read,
  then replace with its ``resourceVersion``; a conflict is retried), and writes nothing
  when the rendering's hash and the replica count are unchanged: it is idempotent and
  cheap to call on every evaluation. ``replicas`` is the autoscaler's number, 0 included.
- **Pods get code and weights from the node agent, never from the control plane.** The
  agent's socket folder and the node's weights folder are hostPath volumes; a pushed
  deployment's pods run ``bdn serve-delivered`` (control/pod.py): it starts the code and
  weights pulls through the socket, runs ``bdn serve`` on them, and releases its pulls
  when the pod stops; a deployment made from a folder must name one inside the node's
  weights folder (checked before anything is written). Model secrets come from the
  Secret ``bdn-model-secrets`` (optional), never from the Deployment's own fields.
- **Readiness is the pod's**: the readiness probe is ``GET /health/ready``, and ready
  pods are found by a watch on Pods (one list, then a watch from its
  ``resourceVersion``; relisted on 410), not by polling. A ready pod's URL is its pod
  IP at the container port: the router reaches pods directly, as with EndpointSlices.
- **Resources**: ``resources:`` (control/resources.py) picks the instance type; its
  CPU, memory and ``nvidia.com/gpu`` become requests/limits, its accelerator a node
  selector (``bdn.dev/accelerator``) and the GPU taint a toleration.
- **Rollouts**: ``maxSurge``/``maxUnavailable`` come from the environment's promotion
  settings when the controller passes them, else from the options. Replicas the
  controller retires are marked with ``controller.kubernetes.io/pod-deletion-cost`` so a
  ReplicaSet removes them first on scale-down (honoured from Kubernetes 1.22). Older API
  servers pick by their own ranking (newest-ready first), which would stop a pod still
  serving and leave the drained one running: there the retired pods are deleted first,
  then the count lowered (a replacement created in between is unready, so it is what the
  ReplicaSet removes). :func:`rollout_kwargs` is the hook a rolling promotion uses to
  pass its surge/unavailable steps.
- **Restarts adopt**: objects are found by label, so a new control plane's ``start``
  sees every existing Deployment and pod (``adopted()``), ``apply`` updates them in
  place (no duplicates), and ``prune(keep)`` deletes those whose bdn deployment no
  longer exists (no orphans). ``close`` leaves the objects for the next control plane.

The API calls are the ``kubernetes`` client's (synchronous) run in threads; the watch
runs in one thread and hands events to the event loop. Every verb used here is listed
in deploy/base/rbac.yaml and nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import shlex
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from control.backends import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    ColdStartRecord,
    ReplicaStatus,
)
from control.errors import BackendError, RequestError
from control.resources import (
    ACCELERATOR_LABEL,
    GPU_RESOURCE,
    InstanceType,
    choose_instance_type,
    kube_resources,
    parse_resources,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
DEFAULT_AGENT_SOCKET_DIR = "/run/bdn"
DEFAULT_NODE_WEIGHTS_DIR = "/var/lib/bdn/mounts"
AGENT_SOCKET_NAME = "agent.sock"
MODEL_SECRETS_NAME = "bdn-model-secrets"
MANAGED_BY = "bdn-control"
APP_NAME = "bdn-replica"
LABEL_MODEL = "bdn.dev/model"
LABEL_DEPLOYMENT = "bdn.dev/deployment"
LABEL_REVISION = "bdn.dev/revision"
ANNOTATION_HASH = "bdn.dev/spec-hash"
ANNOTATION_NAME = "bdn.dev/deployment-name"
ANNOTATION_INSTANCE = "bdn.dev/instance-type"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
RETIRED_DELETION_COST = "-1000000"
# ReplicaSets honour DELETION_COST from this (major, minor) version on.
DELETION_COST_SINCE = (1, 22)
DEFAULT_TERMINATION_GRACE_S = 30
DEFAULT_REMOVE_TIMEOUT_S = 120.0
READY_PROBE_PERIOD_S = 2
WATCH_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 30.0
REPLACE_TRIES = 5
# Container states that will not fix themselves: reported as failed with their reason.
FATAL_WAITING = frozenset({"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff",
                           "InvalidImageName", "CreateContainerConfigError",
                           "CreateContainerError", "RunContainerError"})
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_PERCENT_OR_INT = re.compile(r"^(100|[1-9]?[0-9])%$|^[0-9]+$")
MAX_NAME_CHARS = 63


@dataclass(frozen=True)
class Rollout:
    """How a rolling update replaces pods (from the promotion settings)."""

    max_surge: str = "25%"
    max_unavailable: str = "0"

    def __post_init__(self) -> None:
        for name in ("max_surge", "max_unavailable"):
            if not _PERCENT_OR_INT.match(str(getattr(self, name))):
                raise RequestError("must be a count or a percentage such as 25%", field=name)
        if str(self.max_surge).rstrip("%") in ("0", "") and \
                str(self.max_unavailable).rstrip("%") in ("0", ""):
            raise RequestError("max_surge and max_unavailable may not both be 0",
                               field="max_surge")

    @classmethod
    def from_percent(cls, max_surge_percent: int, max_unavailable_percent: int) -> Rollout:
        return cls(f"{max_surge_percent}%", f"{max_unavailable_percent}%")


def rollout_kwargs(backend: Any, max_surge_percent: int,
                   max_unavailable_percent: int) -> dict[str, Any]:
    """Keyword arguments a rolling promotion adds to ``backend.apply``.

    The hook for the rollout executor: ``await backend.apply(spec, n, retire,
    **rollout_kwargs(backend, surge, unavailable))`` gives a Kubernetes Deployment the
    environment's surge/unavailable steps (as percentages) for its rolling update; other
    backends take no such argument and get none.
    """
    if getattr(backend, "name", None) != "kubernetes":
        return {}
    return {"rollout": Rollout.from_percent(max_surge_percent, max_unavailable_percent)}


@dataclass(frozen=True)
class KubeBackendOptions:
    """Settings of the Kubernetes backend (``bdn control-server --backend kubernetes``)."""

    namespace: str = "bdn"
    kubeconfig: str | None = None  # None: in-cluster config (the pod's ServiceAccount)
    context: str | None = None
    # The replicas' image; "" means the image of the control plane's own pod
    # (``own_pod``, from the downward API), so the kustomization names it once.
    image: str = ""
    own_pod: str = ""
    # The container's command; () runs the image's entrypoint (``bdn``) with
    # ``serve MODEL_DIR ...``, else this argv prefix (like LocalBackendOptions.command).
    command: tuple[str, ...] = ()
    port: int = DEFAULT_PORT
    agent_socket_dir: str = DEFAULT_AGENT_SOCKET_DIR
    node_weights_dir: str = DEFAULT_NODE_WEIGHTS_DIR
    gpu_resource: str = GPU_RESOURCE
    accelerator_label: str = ACCELERATOR_LABEL
    rollout: Rollout = field(default_factory=Rollout)
    termination_grace_s: int = DEFAULT_TERMINATION_GRACE_S
    remove_timeout_s: float = DEFAULT_REMOVE_TIMEOUT_S
    image_pull_secret: str | None = None
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.namespace) or len(self.namespace) > MAX_NAME_CHARS:
            raise RequestError(f"not a Kubernetes namespace name: {self.namespace!r}",
                               field="namespace")
        if not self.image and not self.own_pod:
            raise RequestError("must name an image (or own_pod: the control plane's pod, "
                               "whose image replicas then run)", field="image")
        if not 0 < self.port < 65536:
            raise RequestError("must be 1-65535", field="port")
        for name in ("agent_socket_dir", "node_weights_dir"):
            if not PurePosixPath(getattr(self, name)).is_absolute():
                raise RequestError("must be an absolute path", field=name)
        if self.termination_grace_s < 0:
            raise RequestError("must not be negative", field="termination_grace_s")
        if self.remove_timeout_s <= 0:
            raise RequestError("must be positive", field="remove_timeout_s")


def object_name(model_id: str, deployment_id: str) -> str:
    """``bdn-<model>-<deployment>``, a DNS label; long or odd ids get a hash suffix."""
    raw = f"bdn-{model_id}-{deployment_id}".lower()
    clean = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")
    if clean == raw and len(clean) <= MAX_NAME_CHARS - 6:  # room for ReplicaSet suffixes
        return clean
    digest = hashlib.blake2b(raw.encode(), digest_size=4).hexdigest()
    return f"{clean[:MAX_NAME_CHARS - 6 - 9].rstrip('-')}-{digest}"


def label_value(value: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-_.")
    if clean == value and len(value) <= MAX_NAME_CHARS:
        return value
    digest = hashlib.blake2b(value.encode(), digest_size=4).hexdigest()
    return f"{clean[:MAX_NAME_CHARS - 9].rstrip('-_.')}-{digest}".lstrip("-")


def _contained(path: str, root: str) -> bool:
    p, r = PurePosixPath(path), PurePosixPath(root)
    return p.is_absolute() and ".." not in p.parts and (p == r or r in p.parents)


class KubernetesBackend:
    """Replicas as pods of one Kubernetes Deployment per bdn deployment."""

    name = "kubernetes"

    def __init__(self, options: KubeBackendOptions, api_client: Any = None) -> None:
        self.options = options
        self._api_client = api_client
        self._listeners: list[Callable[[ReplicaStatus], None]] = []
        self._pods: dict[str, dict[str, ReplicaStatus]] = {}
        # Pods being deleted (deletionTimestamp set): no longer replicas, not yet gone.
        self._terminating: dict[str, set[str]] = {}
        self._deployments: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._started: asyncio.Future[None] | None = None
        self._apps: Any = None
        self._core: Any = None
        self._image = self.options.image
        # Whether ReplicaSets honour pod-deletion-cost (Kubernetes 1.22+); until start()
        # has asked the API server, assume not (the choice that is right either way).
        self._deletion_cost = False

    # -- connection -------------------------------------------------------------------

    def _client(self) -> Any:
        from kubernetes import client, config

        if self._api_client is None:
            o = self.options
            if o.kubeconfig:
                cfg = client.Configuration()
                config.load_kube_config(config_file=o.kubeconfig, context=o.context,
                                        client_configuration=cfg)
            else:
                cfg = client.Configuration()
                config.load_incluster_config(client_configuration=cfg)
            self._api_client = client.ApiClient(cfg)
        return self._api_client

    async def start(self) -> None:
        """Connect, list what exists (adoption) and start the pod watch. Idempotent."""
        if self._started is not None:
            return await asyncio.shield(self._started)
        loop = self._loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        try:
            from kubernetes import client

            api = await asyncio.to_thread(self._client)
            self._apps, self._core = client.AppsV1Api(api), client.CoreV1Api(api)
            if not self._image:
                self._image = await asyncio.to_thread(self._own_image)
            self._deletion_cost = await asyncio.to_thread(self._honours_deletion_cost, api)
            found = await asyncio.to_thread(self._list_deployments)
            self._deployments = {dep_id: n for dep_id, (_, n) in found.items()}
            first_list: asyncio.Future[None] = loop.create_future()
            self._watcher = threading.Thread(target=self._watch,
                                             args=(first_list, self._stop),
                                             name="kube-pod-watch", daemon=True)
            self._watcher.start()
            await first_list
        except BaseException as e:
            # Not started: the next call tries again (the API server may be back).
            error = self._wrap(e, "connecting to the API server")
            self._started.set_exception(error)
            self._started.exception()  # retrieved: no "never retrieved" warning
            self._started = None
            self._stop.set()
            self._stop = threading.Event()
            if error is e:
                raise
            raise error from e
        self._started.set_result(None)
        log.info("kubernetes backend: namespace %s, adopted %d deployments",
                 self.options.namespace, len(self._deployments))

    def _wrap(self, e: BaseException, doing: str) -> BaseException:
        if isinstance(e, BackendError) or not isinstance(e, Exception):
            return e
        status = getattr(e, "status", None)
        reason = getattr(e, "reason", None) or str(e)
        body = getattr(e, "body", None)
        detail = ""
        if body:
            with contextlib.suppress(ValueError, TypeError):
                detail = ": " + str(json.loads(body).get("message", ""))
        return BackendError(f"kubernetes ({self.options.namespace}) {doing} failed"
                            f"{f' with {status}' if status else ''}: {reason}{detail}")

    # -- the protocol -----------------------------------------------------------------

    def subscribe(self, on_change: Callable[[ReplicaStatus], None]) -> None:
        self._listeners.append(on_change)

    async def apply(self, spec: Any, replicas: int, retire: Sequence[str] = (), *,
                    resources: Mapping[str, Any] | None = None,
                    rollout: Rollout | None = None) -> None:
        """Deployment ``spec.deployment_id`` should run ``replicas`` pods of ``spec``.

        ``resources`` (``config.yaml``'s section) defaults to ``spec.resources`` where the
        spec carries one; ``rollout`` to the options' rollout.
        """
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise RequestError("must be a count >= 0", field="replicas")
        self.render(spec, replicas, resources=resources, rollout=rollout)  # refuse early
        await self.start()
        body = self.render(spec, replicas, resources=resources, rollout=rollout)
        try:
            # Only this deployment's own pods are ever marked or deleted.
            mine = [r for r in retire if r in self._pods.get(spec.deployment_id, {})]
            if mine:
                await asyncio.to_thread(self._mark_retired, mine)
                if replicas > 0 and not self._deletion_cost:
                    # Without pod-deletion-cost a ReplicaSet picks by its own ranking
                    # (the newest-ready pod first), not the one the controller drained.
                    # So the retired pod goes first, then the count drops: a
                    # replacement the ReplicaSet may create meanwhile is not ready yet,
                    # and unready pods are the first it removes on the scale-down.
                    await asyncio.to_thread(self._delete_pods, mine)
            await asyncio.to_thread(self._upsert, body)
        except BackendError:
            raise
        except Exception as e:
            raise self._wrap(e, f"applying deployment {spec.deployment_id}") from e
        self._deployments[spec.deployment_id] = replicas

    def observe(self, deployment_id: str) -> list[ReplicaStatus]:
        return list(self._pods.get(deployment_id, {}).values())

    async def remove(self, deployment_id: str) -> None:
        """Delete the Deployment (its ReplicaSets and pods go with it) and wait for the
        pods to be gone, within ``remove_timeout_s``."""
        await self.start()
        try:
            found = await asyncio.to_thread(self._list_deployments)
            for dep_id, (name, _) in found.items():
                if dep_id == deployment_id:
                    await asyncio.to_thread(self._delete_deployment, name)
        except Exception as e:
            raise self._wrap(e, f"removing deployment {deployment_id}") from e
        self._deployments.pop(deployment_id, None)
        try:
            await asyncio.wait_for(
                self._until(lambda: not self._pods.get(deployment_id)
                            and not self._terminating.get(deployment_id)),
                timeout=self.options.remove_timeout_s)
        except TimeoutError:
            raise BackendError(f"pods of deployment {deployment_id} still exist "
                               f"{self.options.remove_timeout_s:.0f} s after its Deployment "
                               "was deleted") from None

    async def close(self) -> None:
        """Stop watching; the cluster objects stay for the next control plane."""
        self._stop.set()
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.join, 1.0)
        if self._api_client is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._api_client.close)

    # -- adoption ---------------------------------------------------------------------

    def adopted(self) -> dict[str, int]:
        """bdn deployment id → replicas, for every Deployment this backend manages."""
        return dict(self._deployments)

    async def prune(self, keep: Collection[str]) -> list[str]:
        """Delete managed Deployments whose bdn deployment is not in ``keep``."""
        await self.start()
        removed = []
        found = await asyncio.to_thread(self._list_deployments)
        for dep_id in found:
            if dep_id not in keep:
                await self.remove(dep_id)
                removed.append(dep_id)
        return removed

    async def wait_ready(self, deployment_id: str, count: int, timeout_s: float) -> None:
        """Until exactly ``count`` pods of the deployment are ready and none other exists
        (woken by the watch, not polled)."""
        def settled() -> bool:
            pods = self.observe(deployment_id)
            return len(pods) == count and all(p.state == READY for p in pods)
        try:
            await asyncio.wait_for(self._until(settled), timeout=timeout_s)
        except TimeoutError:
            states = [(p.id, p.state, p.error) for p in self.observe(deployment_id)]
            raise BackendError(f"deployment {deployment_id}: not {count} ready pods within "
                               f"{timeout_s:.0f} s; pods: {states}") from None

    async def _until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            self._changed.clear()
            await self._changed.wait()

    # -- rendering (pure) -------------------------------------------------------------

    def instance_type(self, spec: Any,
                      resources: Mapping[str, Any] | None = None) -> InstanceType:
        data = resources if resources is not None else getattr(spec, "resources", None)
        req = parse_resources(data)
        return choose_instance_type(req)

    def render(self, spec: Any, replicas: int, *,
               resources: Mapping[str, Any] | None = None,
               rollout: Rollout | None = None) -> dict[str, Any]:
        """The Deployment for ``spec`` at ``replicas`` (a dict the API server accepts)."""
        o = self.options
        image = self._image or "bdn"  # before start() has found the control pod's own
        data = resources if resources is not None else getattr(spec, "resources", None)
        req = parse_resources(data)
        it = choose_instance_type(req)
        kube = kube_resources(it, req, gpu_resource=o.gpu_resource,
                              accelerator_label=o.accelerator_label)
        name = object_name(spec.model_id, spec.deployment_id)
        selector = {"app.kubernetes.io/managed-by": MANAGED_BY,
                    LABEL_DEPLOYMENT: label_value(spec.deployment_id)}
        labels = {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": name,
                  "app.kubernetes.io/component": "replica", "app.kubernetes.io/part-of": "bdn",
                  LABEL_MODEL: label_value(spec.model_id), **selector}
        annotations = {ANNOTATION_NAME: str(spec.deployment_name),
                       ANNOTATION_INSTANCE: it.name, LABEL_DEPLOYMENT: spec.deployment_id,
                       LABEL_MODEL: spec.model_id, LABEL_REVISION: str(spec.revision)}
        code = getattr(spec, "code", None)
        socket_dir, weights_dir = o.agent_socket_dir, o.node_weights_dir
        socket = f"{socket_dir}/{AGENT_SOCKET_NAME}"
        listen = f"$(BDN_POD_IP):{o.port}"
        if code:
            # A pushed deployment: the pod's entrypoint has the node agent deliver code
            # and weights, runs bdn serve on them and releases its pulls when stopped.
            command: list[str] = []
            args = ["serve-delivered", "--agent-socket", socket, "--mounts-root",
                    weights_dir, "--deployment", spec.deployment_id, "--code", str(code),
                    "--weights", json.dumps([dict(w) for w in getattr(spec, "weights", ())],
                                            sort_keys=True),
                    "--listen", listen]
            if o.command:
                args += ["--serve-command", shlex.join(o.command)]
        else:
            model_dir = str(spec.model_dir)
            if not _contained(model_dir, weights_dir):
                raise BackendError(
                    f"deployment {spec.deployment_id}: model folder {model_dir} is not in the "
                    f"node's weights folder {weights_dir}; a pod sees nothing of the control "
                    "plane's files (push the model so the node agent delivers it)")
            if o.command:
                command, args = list(o.command), [model_dir, "--listen", listen]
            else:
                command, args = [], ["serve", model_dir, "--listen", listen]
        env: list[dict[str, Any]] = [
            {"name": "BDN_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "BDN_REPLICA_ID",
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "BDN_MODEL_ID", "value": spec.model_id},
            {"name": "BDN_DEPLOYMENT_ID", "value": spec.deployment_id},
            {"name": "BDN_AGENT_SOCKET", "value": socket},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ]
        environment = getattr(spec, "environment", None)
        if environment:
            env.append({"name": "BDN_ENVIRONMENT", "value": str(environment)})
        own = {e["name"] for e in env}
        # Secret values never go into the Deployment (anyone who can read it would see
        # them): they come from the model-secrets Secret through envFrom.
        for key, value in [*o.env, *getattr(spec, "env", ())]:
            if key not in own and not key.startswith("BDN_SECRET_"):
                env.append({"name": key, "value": value})
                own.add(key)
        container: dict[str, Any] = {
            "name": "replica", "image": image, "imagePullPolicy": "IfNotPresent",
            "args": args, "env": env,
            "envFrom": [{"secretRef": {"name": MODEL_SECRETS_NAME, "optional": True}}],
            "ports": [{"name": "http", "containerPort": o.port, "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/health/ready", "port": "http"},
                               "periodSeconds": READY_PROBE_PERIOD_S, "failureThreshold": 2},
            "livenessProbe": {"httpGet": {"path": "/health/live", "port": "http"},
                              "periodSeconds": 10, "failureThreshold": 6},
            "resources": {"requests": kube.requests, "limits": kube.limits},
            "securityContext": _container_security(),
            "volumeMounts": [*_mounts(socket_dir, weights_dir),
                             {"name": "tmp", "mountPath": "/tmp"}],
        }
        if command:
            container["command"] = command
        pod_spec: dict[str, Any] = {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": o.termination_grace_s,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": [
                {"name": "agent", "hostPath": {"path": socket_dir, "type": "Directory"}},
                {"name": "weights", "hostPath": {"path": weights_dir, "type": "Directory"}},
                {"name": "tmp", "emptyDir": {}},
            ],
        }
        if kube.node_selector:
            pod_spec["nodeSelector"] = kube.node_selector
        if kube.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in kube.tolerations]
        if o.image_pull_secret:
            pod_spec["imagePullSecrets"] = [{"name": o.image_pull_secret}]
        roll = rollout or o.rollout
        body: dict[str, Any] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": o.namespace, "labels": labels,
                         "annotations": dict(annotations)},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": selector},
                "revisionHistoryLimit": 2,
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {
                                 "maxSurge": _int_or_percent(roll.max_surge),
                                 "maxUnavailable": _int_or_percent(roll.max_unavailable)}},
                "template": {
                    "metadata": {"labels": {**labels, LABEL_REVISION: str(spec.revision)},
                                 "annotations": dict(annotations)},
                    "spec": pod_spec,
                },
            },
        }
        body["metadata"]["annotations"][ANNOTATION_HASH] = _hash(body)
        return body

    # -- API calls (in threads) -------------------------------------------------------

    def _own_image(self) -> str:
        pod = self._core.read_namespaced_pod(self.options.own_pod, self.options.namespace,
                                             _request_timeout=REQUEST_TIMEOUT_S)
        return str(pod.spec.containers[0].image)

    def _list_deployments(self) -> dict[str, tuple[str, int]]:
        items = self._apps.list_namespaced_deployment(
            self.options.namespace, label_selector=f"app.kubernetes.io/managed-by={MANAGED_BY}",
            _request_timeout=REQUEST_TIMEOUT_S).items
        found = {}
        for d in items:
            ann = d.metadata.annotations or {}
            dep_id = ann.get(LABEL_DEPLOYMENT) or (d.metadata.labels or {}).get(LABEL_DEPLOYMENT)
            if dep_id:
                found[dep_id] = (d.metadata.name, int(d.spec.replicas or 0))
        return found

    def _upsert(self, body: dict[str, Any]) -> None:
        from kubernetes.client.rest import ApiException

        ns, name = self.options.namespace, body["metadata"]["name"]
        for _ in range(REPLACE_TRIES):
            try:
                current = self._apps.read_namespaced_deployment(
                    name, ns, _request_timeout=REQUEST_TIMEOUT_S)
            except ApiException as e:
                if e.status != 404:
                    raise
                try:
                    self._apps.create_namespaced_deployment(
                        ns, body, _request_timeout=REQUEST_TIMEOUT_S)
                    log.info("created Deployment %s/%s with %d replicas", ns, name,
                             body["spec"]["replicas"])
                    return
                except ApiException as e2:
                    if e2.status == 409:  # created meanwhile: read it and replace
                        continue
                    raise
            ann = current.metadata.annotations or {}
            if ann.get(ANNOTATION_HASH) == body["metadata"]["annotations"][ANNOTATION_HASH] \
                    and current.spec.replicas == body["spec"]["replicas"]:
                return
            replaced = json.loads(json.dumps(body))
            replaced["metadata"]["resourceVersion"] = current.metadata.resource_version
            try:
                self._apps.replace_namespaced_deployment(
                    name, ns, replaced, _request_timeout=REQUEST_TIMEOUT_S)
                log.info("updated Deployment %s/%s: %d replicas", ns, name,
                         body["spec"]["replicas"])
                return
            except ApiException as e:
                if e.status != 409:  # 409: changed meanwhile, read again
                    raise
        raise BackendError(f"Deployment {name} kept changing under {REPLACE_TRIES} updates")

    def _honours_deletion_cost(self, api: Any) -> bool:
        from kubernetes import client

        try:
            info = client.VersionApi(api).get_code(_request_timeout=REQUEST_TIMEOUT_S)
            major = int(re.sub(r"\D", "", info.major) or 0)
            minor = int(re.sub(r"\D", "", info.minor) or 0)
        except Exception as e:  # unknown: take the path that is right either way
            log.warning("could not read the API server's version (%s); retiring pods by "
                        "deleting them", e)
            return False
        return (major, minor) >= DELETION_COST_SINCE

    def _delete_pods(self, pod_names: list[str]) -> None:
        from kubernetes.client.rest import ApiException

        for pod in pod_names:
            try:
                self._core.delete_namespaced_pod(pod, self.options.namespace,
                                                 _request_timeout=REQUEST_TIMEOUT_S)
                log.info("deleted retired pod %s/%s", self.options.namespace, pod)
            except ApiException as e:
                if e.status != 404:  # already gone is what retiring wants
                    raise

    def _mark_retired(self, pod_names: list[str]) -> None:
        from kubernetes.client.rest import ApiException

        for pod in pod_names:
            try:
                self._core.patch_namespaced_pod(
                    pod, self.options.namespace,
                    {"metadata": {"annotations": {DELETION_COST: RETIRED_DELETION_COST}}},
                    _request_timeout=REQUEST_TIMEOUT_S)
            except ApiException as e:
                if e.status != 404:  # already gone is what retiring wants
                    raise

    def _delete_deployment(self, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            self._apps.delete_namespaced_deployment(
                name, self.options.namespace,
                body=client.V1DeleteOptions(propagation_policy="Background"),
                _request_timeout=REQUEST_TIMEOUT_S)
            log.info("deleted Deployment %s/%s", self.options.namespace, name)
        except ApiException as e:
            if e.status != 404:
                raise

    # -- the pod watch ----------------------------------------------------------------

    def _watch(self, first_list: asyncio.Future[None], stop: threading.Event) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        assert self._loop is not None
        ns = self.options.namespace
        selector = f"app.kubernetes.io/managed-by={MANAGED_BY}"
        rv: str | None = None
        while not stop.is_set():
            try:
                if rv is None:
                    listing = self._core.list_namespaced_pod(
                        ns, label_selector=selector, _request_timeout=REQUEST_TIMEOUT_S)
                    rv = listing.metadata.resource_version
                    self._loop.call_soon_threadsafe(self._relisted, listing.items)
                    if not first_list.done():
                        self._loop.call_soon_threadsafe(_resolve, first_list)
                w = watch.Watch()
                for ev in w.stream(self._core.list_namespaced_pod, ns,
                                   label_selector=selector, resource_version=rv,
                                   timeout_seconds=WATCH_TIMEOUT_S,
                                   _request_timeout=WATCH_TIMEOUT_S + 10):
                    if stop.is_set():
                        w.stop()
                        break
                    if ev["type"] == "ERROR":
                        rv = None  # e.g. 410 Gone as an event: list again
                        break
                    pod = ev["object"]
                    rv = pod.metadata.resource_version
                    self._loop.call_soon_threadsafe(self._on_pod, ev["type"], pod)
            except ApiException as e:
                if e.status == 410:
                    rv = None
                    continue
                self._watch_failed(first_list, stop, e)
            except Exception as e:
                self._watch_failed(first_list, stop, e)
            except BaseException:  # interpreter shutting down
                return

    def _watch_failed(self, first_list: asyncio.Future[None], stop: threading.Event,
                      e: Exception) -> None:
        if self._loop is None or self._loop.is_closed():
            stop.set()  # nobody left to tell: the backend's loop is gone
            return
        if stop.is_set():
            return
        if not first_list.done():
            self._loop.call_soon_threadsafe(_fail, first_list, self._wrap(e, "listing pods"))
            stop.set()
            return
        log.warning("pod watch in %s broke (%s); watching again", self.options.namespace, e)
        stop.wait(1.0)

    def _relisted(self, pods: list[Any]) -> None:
        seen: set[tuple[str, str]] = set()
        self._terminating.clear()
        for pod in pods:
            status = self._status(pod, deleted=False)
            if status is not None:
                seen.add((status.deployment_id, status.id))
                self._on_pod("ADDED", pod)
        for dep_id, group in list(self._pods.items()):
            for pod_name, old in list(group.items()):
                if (dep_id, pod_name) not in seen:  # deleted while we were not watching
                    self._record(ReplicaStatus(id=pod_name, deployment_id=dep_id,
                                               revision=old.revision, state=STOPPED))

    def _on_pod(self, kind: str, pod: Any) -> None:
        status = self._status(pod, deleted=kind == "DELETED")
        if status is None:
            return
        terminating = self._terminating.setdefault(status.deployment_id, set())
        if kind == "DELETED":
            terminating.discard(status.id)
        elif pod.metadata.deletion_timestamp is not None:
            terminating.add(status.id)
        if not terminating:
            self._terminating.pop(status.deployment_id, None)
        self._record(status)

    def _record(self, status: ReplicaStatus) -> None:
        group = self._pods.setdefault(status.deployment_id, {})
        old = group.get(status.id)
        if status.state == STOPPED:
            group.pop(status.id, None)
            if not group:
                self._pods.pop(status.deployment_id, None)
            if old is None or old.state == STOPPED:
                self._changed.set()
                return
        else:
            group[status.id] = status
        if old is not None and (old.state, old.url, old.error, old.revision) == (
                status.state, status.url, status.error, status.revision):
            return
        self._changed.set()
        for listener in list(self._listeners):
            try:
                listener(status)
            except Exception:  # one listener's bug must not stop the watch
                log.exception("replica status listener failed")

    def _status(self, pod: Any, *, deleted: bool) -> ReplicaStatus | None:
        ann = pod.metadata.annotations or {}
        dep_id = ann.get(LABEL_DEPLOYMENT)
        if not dep_id:
            return None
        try:
            revision = int(ann.get(LABEL_REVISION, "0"))
        except ValueError:
            revision = 0
        name = pod.metadata.name
        st = pod.status
        if deleted or pod.metadata.deletion_timestamp is not None or (
                st is not None and st.phase == "Succeeded"):
            return ReplicaStatus(id=name, deployment_id=dep_id, revision=revision,
                                 state=STOPPED)
        conditions = {c.type: c for c in (st.conditions or [])} if st else {}
        error = None
        if st is not None and st.phase == "Failed":
            error = f"pod {name} failed: {st.reason or ''} {st.message or ''}".strip()
            for cs in st.container_statuses or []:
                term = cs.state.terminated if cs.state else None
                if term is not None:
                    error = (f"pod {name}: container {cs.name} exited with status "
                             f"{term.exit_code} ({term.reason or 'Error'})")
            return ReplicaStatus(id=name, deployment_id=dep_id, revision=revision,
                                 state=FAILED, error=error)
        for cs in (st.container_statuses or []) if st else []:
            waiting = cs.state.waiting if cs.state else None
            if waiting is not None and waiting.reason in FATAL_WAITING:
                return ReplicaStatus(id=name, deployment_id=dep_id, revision=revision,
                                     state=FAILED,
                                     error=f"pod {name}: {waiting.reason}: {waiting.message}")
        scheduled = conditions.get("PodScheduled")
        if scheduled is not None and scheduled.status == "False":
            error = f"pod {name} not scheduled: {scheduled.message or scheduled.reason}"
        ready = conditions.get("Ready")
        ip = st.pod_ip if st is not None else None
        if ready is not None and ready.status == "True" and ip:
            host = f"[{ip}]" if ":" in ip else ip
            return ReplicaStatus(id=name, deployment_id=dep_id, revision=revision,
                                 state=READY, url=f"http://{host}:{self.options.port}",
                                 cold_start=_cold_start(pod.metadata.creation_timestamp,
                                                        scheduled, ready))
        return ReplicaStatus(id=name, deployment_id=dep_id, revision=revision,
                             state=STARTING, error=error)


def _int_or_percent(value: str) -> int | str:
    # An IntOrString: the API server reads "0" as a malformed percentage.
    return int(value) if str(value).isdigit() else str(value)


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def _mounts(socket_dir: str, weights_dir: str) -> list[dict[str, Any]]:
    # Same paths inside as on the node: the agent names mounts by its own paths.
    return [{"name": "agent", "mountPath": socket_dir},
            {"name": "weights", "mountPath": weights_dir, "readOnly": True}]


def _hash(body: dict[str, Any]) -> str:
    without = json.loads(json.dumps(body))
    without["spec"].pop("replicas", None)
    without["metadata"]["annotations"].pop(ANNOTATION_HASH, None)
    return hashlib.blake2b(json.dumps(without, sort_keys=True).encode(),
                           digest_size=10).hexdigest()


def _cold_start(created: datetime | None, scheduled: Any, ready: Any) -> ColdStartRecord:
    record = ColdStartRecord()
    if created is None:
        return record
    if scheduled is not None and scheduled.last_transition_time is not None:
        record.phases["slot"] = max(0.0, (scheduled.last_transition_time
                                          - created).total_seconds())
    if ready.last_transition_time is not None:
        record.phases["total"] = max(0.0, (ready.last_transition_time - created).total_seconds())
    return record


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fail(fut: asyncio.Future[None], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)
