"""Push to ready on Kubernetes, end to end: the issue's proof.

Real processes all the way: etcd + kube-apiserver + controller-manager + scheduler and
the stand-in kubelet (tests/kube/conftest.py), a real ``bdn agent`` on a socket in a
folder this test owns (the stand-in nodes' agent socket folder and weights folder are
the backend's hostPath options, pointed at tmp_path), and ``bdn control-server
--backend kubernetes`` as a process. ``bdn push`` sends a model whose weights live in a
local folder; every replica is a pod whose process is ``bdn serve-delivered``: it has
the agent deliver the pushed code and weights and runs the real ``bdn serve`` on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentClient
from control.backends import ReplicaSpec
from control.kube import KubeBackendOptions, KubernetesBackend, object_name
from control.resources import GPU_RESOURCE
from tests.support.control import API_KEY, ControlServer, real_serve_available
from tests.support.kube import NODES, Lab
from tests.support.models import write_model_dir
from tests.support.procs import ServiceProcess, bdn_command

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not real_serve_available(),
                                reason="needs bdn serve (the serving package)")]

READY_TIMEOUT_S = 240.0
FAST_DOWN = {"autoscaling_window": 10, "scale_down_delay": 0}
IMAGE = "bdn-test:1"

MODEL_PY = '''
import os


class Model:
    def __init__(self, **kwargs):
        self._weights = kwargs["weights"]
        self.tensors = None

    def load(self):
        self.tensors = self._weights.load()

    def predict(self, model_input):
        return {"tensors": len(self.tensors), "replica": os.environ.get("BDN_REPLICA_ID"),
                "input": model_input}
'''


def model_folder(root: Path, upstream: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "config.yaml").write_text(textwrap.dedent(f"""\
        model_name: tiny
        resources:
          accelerator: L4
        weights:
          - source: file://{upstream}
            mount_location: /app/weights/tiny
        """))
    (root / "model" / "model.py").write_text(MODEL_PY)
    return root


class Node:
    """The stand-in nodes' host folders (owned by this test) and the agent serving them."""

    def __init__(self, root: Path, store: Path) -> None:
        self.socket_dir = root / "run"
        self.weights_dir = root / "mounts"
        self.socket_dir.mkdir(parents=True)
        self.weights_dir.mkdir(parents=True)
        self.socket = self.socket_dir / "agent.sock"
        self.agent = ServiceProcess(bdn_command(
            "agent", "--cache-dir", str(root / "cache"), "--socket", str(self.socket),
            "--store", str(store)))

    def pulls(self) -> list[dict[str, Any]]:
        return AgentClient(f"unix:{self.socket}").pulls()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "node", tmp_path / "store")
    try:
        yield n
    finally:
        n.agent.stop()


def control_server(lab: Lab, namespace: str, node: Node, tmp_path: Path) -> ControlServer:
    return ControlServer(
        tmp_path / "state", "--backend", "kubernetes",
        "--kubeconfig", str(lab.cluster.kubeconfig), "--namespace", namespace,
        "--replica-image", IMAGE, "--agent-socket-dir", str(node.socket_dir),
        "--node-weights-dir", str(node.weights_dir), "--store", str(tmp_path / "store"))


def push(srv: ControlServer, home: Path, folder: Path) -> tuple[str, str]:
    env = {**os.environ, "HOME": str(home), "BDN_API_KEY": API_KEY,
           "BDN_CONTROL_URL": srv.url}
    done = subprocess.run(bdn_command("push", str(folder)), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout, done.stderr, srv.proc.output[-3000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["model_id"], out["deployment_id"]


def pods(lab: Lab, namespace: str) -> list[Any]:
    from kubernetes import client

    return list(client.CoreV1Api(lab.api).list_namespaced_pod(namespace).items)


def deployments(lab: Lab, namespace: str) -> list[Any]:
    from kubernetes import client

    return list(client.AppsV1Api(lab.api).list_namespaced_deployment(namespace).items)


def ready_pods(lab: Lab, namespace: str) -> list[str]:
    return sorted(p.metadata.name for p in pods(lab, namespace)
                  if p.metadata.deletion_timestamp is None and any(
                      c.type == "Ready" and c.status == "True"
                      for c in (p.status.conditions or [])))


def settle(srv: ControlServer, lab: Lab, namespace: str, model_id: str, dep_id: str,
           count: int) -> list[str]:
    """Until exactly ``count`` pods exist, all ready, and the control plane routes to
    exactly those; their names."""
    def settled() -> bool:
        names = ready_pods(lab, namespace)
        if len(names) != count or len(pods(lab, namespace)) != count:
            return False
        dep = srv.deployment(model_id, dep_id)
        routed = sorted(r["id"] for r in dep["replicas"] if r["state"] == "ready")
        return routed == names and dep["starting_replica_count"] == 0
    srv.wait_for(f"{count} ready pods of {dep_id}", settled, READY_TIMEOUT_S)
    return ready_pods(lab, namespace)


def predict(srv: ControlServer, model_id: str, dep_id: str, body: Any) -> dict[str, Any]:
    answer = srv.call("POST", f"/models/{model_id}/deployment/{dep_id}/predict", body,
                      timeout_s=READY_TIMEOUT_S)
    assert answer.status == 200, (answer.body, srv.proc.output[-3000:])
    return dict(answer.json())


def test_a_pushed_model_runs_as_pods_scales_and_survives_a_restart(
        lab: Lab, namespace: str, node: Node, tmp_path: Path) -> None:
    from kubernetes.client.rest import ApiException

    home = tmp_path / "home"
    home.mkdir()
    write_model_dir(tmp_path / "upstream", layers=2, hidden=64, shards=1)
    folder = model_folder(tmp_path / "tiny", tmp_path / "upstream")
    srv = control_server(lab, namespace, node, tmp_path)
    try:
        model_id, dep_id = push(srv, home, folder)
        dep = srv.deployment(model_id, dep_id)
        assert dep["instance_type_name"] == "L4:4x16"

        # min_replica 1: a Deployment, one pod asking for the GPU, serving via the router.
        srv.ok("PATCH", f"/v1/models/{model_id}/deployments/{dep_id}/autoscaling_settings",
               {"min_replica": 1, "max_replica": 3, **FAST_DOWN})
        (first,) = settle(srv, lab, namespace, model_id, dep_id, 1)
        (deployment,) = deployments(lab, namespace)
        assert deployment.metadata.name == object_name(model_id, dep_id)
        (pod,) = pods(lab, namespace)
        container = pod.spec.containers[0]
        assert container.resources.requests[GPU_RESOURCE] == "1"
        assert pod.spec.node_selector == {"bdn.dev/accelerator": "L4"}
        assert pod.spec.node_name in NODES
        # Nothing of the control plane's filesystem reaches the pod: only the node's
        # agent socket folder and weights folder are host paths.
        assert {v.host_path.path for v in pod.spec.volumes if v.host_path} == {
            str(node.socket_dir), str(node.weights_dir)}
        assert str(tmp_path / "state") not in json.dumps(
            container.to_dict(), default=str)
        answer = predict(srv, model_id, dep_id, {"x": 1})
        assert answer["tensors"] > 0  # the agent delivered the weights
        assert answer["replica"] == first and answer["input"] == {"x": 1}

        # min_replica 2: two ready pods, both routed to.
        srv.ok("PATCH", f"/v1/models/{model_id}/deployments/{dep_id}/autoscaling_settings",
               {"min_replica": 2})
        two = settle(srv, lab, namespace, model_id, dep_id, 2)
        assert first in two

        # A control-plane restart adopts the pods as they are, and prunes an orphan
        # (a managed Deployment whose bdn deployment does not exist).
        srv.stop()
        orphan = KubernetesBackend(KubeBackendOptions(
            namespace=namespace, kubeconfig=str(lab.cluster.kubeconfig), image=IMAGE,
            agent_socket_dir=str(node.socket_dir), node_weights_dir=str(node.weights_dir)))
        orphan_spec = ReplicaSpec(model_id=model_id, deployment_id="gone0000",
                                  deployment_name="deployment-0",
                                  model_dir=str(node.weights_dir / "gone"))

        import asyncio

        async def make_orphan() -> None:
            try:
                await orphan.apply(orphan_spec, 0)
            finally:
                await orphan.close()
        asyncio.run(make_orphan())
        assert len(deployments(lab, namespace)) == 2
        srv = control_server(lab, namespace, node, tmp_path)
        assert settle(srv, lab, namespace, model_id, dep_id, 2) == two
        assert [d.metadata.name for d in deployments(lab, namespace)] == [
            object_name(model_id, dep_id)]

        # Down to 1: the pod the controller drained is the one that goes, so the one
        # left is the one it routes to (settle checks both).
        srv.ok("PATCH", f"/v1/models/{model_id}/deployments/{dep_id}/autoscaling_settings",
               {"min_replica": 1})
        (left,) = settle(srv, lab, namespace, model_id, dep_id, 1)
        assert left in two

        # Scale to zero, then back from zero through a predict.
        srv.ok("PATCH", f"/v1/models/{model_id}/deployments/{dep_id}/autoscaling_settings",
               {"min_replica": 0})
        settle(srv, lab, namespace, model_id, dep_id, 0)
        (deployment,) = deployments(lab, namespace)
        assert deployment.spec.replicas == 0
        answer = predict(srv, model_id, dep_id, {"y": 2})
        assert answer["input"] == {"y": 2} and answer["tensors"] > 0

        # Deactivate: no pods, the Deployment at 0.
        srv.ok("PATCH", f"/v1/models/{model_id}/deployments/{dep_id}/autoscaling_settings",
               {"min_replica": 1})
        settle(srv, lab, namespace, model_id, dep_id, 1)
        srv.ok("POST", f"/v1/models/{model_id}/deployments/{dep_id}/deactivate")
        settle(srv, lab, namespace, model_id, dep_id, 0)
        (deployment,) = deployments(lab, namespace)
        assert deployment.spec.replicas == 0
        assert srv.deployment(model_id, dep_id)["status"] == "INACTIVE"

        # Delete: the Deployment and its pods are gone.
        srv.ok("DELETE", f"/v1/models/{model_id}/deployments/{dep_id}")
        assert deployments(lab, namespace) == [] and pods(lab, namespace) == []
        with pytest.raises(ApiException):
            from kubernetes import client
            client.AppsV1Api(lab.api).read_namespaced_deployment(
                object_name(model_id, dep_id), namespace)
        # Every pod released its pulls (code and weights) when it stopped.
        states = [p["state"] for p in node.pulls()]
        assert len(states) >= 8 and set(states) == {"released"}, states
    finally:
        srv.stop()
