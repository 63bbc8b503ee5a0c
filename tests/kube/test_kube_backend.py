"""The Kubernetes backend against a real API server, scheduler and controller-manager,
with pods run by the stand-in kubelet as real replica processes (tests/kube/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from control.backends import ReplicaSpec
from control.kube import READY, KubeBackendOptions, KubernetesBackend, object_name
from tests.support.kube import NODES, Lab

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

REPLICA_STANDIN = Path(__file__).resolve().parents[1] / "control" / "replica_standin.py"
READY_TIMEOUT_S = 120.0

MODEL = '''
import os


class Model:
    def __init__(self, **kwargs):
        pass

    def load(self):
        pass

    def predict(self, model_input):
        return {"replica": os.environ.get("BDN_REPLICA_ID"),
                "gpu_env": os.environ.get("BDN_AGENT_SOCKET"), "input": model_input}
'''


def model_folder(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "config.yaml").write_text(textwrap.dedent("""\
        model_name: echo
        resources:
          accelerator: L4
        """))
    (root / "model" / "model.py").write_text(MODEL)
    return root


def backend(lab: Lab, namespace: str) -> KubernetesBackend:
    return KubernetesBackend(KubeBackendOptions(
        namespace=namespace, kubeconfig=str(lab.cluster.kubeconfig), image="bdn-test:1",
        command=(sys.executable, str(REPLICA_STANDIN)),
        agent_socket_dir=str(lab.node_root / "run"),
        node_weights_dir=str(lab.node_root / "mounts"), termination_grace_s=5))


def post_json(url: str, body: Any) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


async def test_replicas_follow_the_desired_count_and_a_new_backend_adopts_them(
        lab: Lab, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    apps, core = client.AppsV1Api(lab.api), client.CoreV1Api(lab.api)
    folder = model_folder(lab.node_root / "mounts" / namespace / "echo")
    spec = ReplicaSpec(model_id="m2abcdef", deployment_id="d2abcdef",
                       deployment_name="deployment-1", model_dir=str(folder))
    resources = {"accelerator": "L4"}
    first = backend(lab, namespace)
    seen: list[Any] = []
    first.subscribe(seen.append)
    try:
        # 1 replica with an L4: a Deployment, a pod asking for the GPU, serving.
        await first.apply(spec, 1, resources=resources)
        await first.wait_ready(spec.deployment_id, 1, READY_TIMEOUT_S)
        name = object_name(spec.model_id, spec.deployment_id)
        dep = await asyncio.to_thread(apps.read_namespaced_deployment, name, namespace)
        assert dep.spec.replicas == 1
        assert dep.metadata.annotations["bdn.dev/instance-type"] == "L4:4x16"
        pods = (await asyncio.to_thread(core.list_namespaced_pod, namespace)).items
        assert len(pods) == 1
        container = pods[0].spec.containers[0]
        assert container.resources.requests["nvidia.com/gpu"] == "1"
        assert container.resources.limits["nvidia.com/gpu"] == "1"
        assert pods[0].spec.node_selector == {"bdn.dev/accelerator": "L4"}
        assert pods[0].spec.node_name in NODES
        (ready,) = first.observe(spec.deployment_id)
        assert ready.state == READY and ready.id == pods[0].metadata.name
        assert ready.url.startswith(f"http://{lab.ip_prefix}.")
        answer = await asyncio.to_thread(post_json, f"{ready.url}/predict", {"x": 1})
        assert answer["input"] == {"x": 1}
        assert answer["replica"] == ready.id
        # The watch told the subscriber: starting, then ready.
        assert [s.state for s in seen if s.id == ready.id][-1] == READY

        # Raise to 2: two ready pods, each its own address.
        await first.apply(spec, 2, resources=resources)
        await first.wait_ready(spec.deployment_id, 2, READY_TIMEOUT_S)
        urls = {s.url for s in first.observe(spec.deployment_id)}
        assert len(urls) == 2
        for url in urls:
            assert (await asyncio.to_thread(post_json, f"{url}/predict", {}))["input"] == {}

        # A control-plane restart: a new backend adopts what exists, duplicates nothing.
        await first.close()
        second = backend(lab, namespace)
        try:
            await second.start()
            assert second.adopted() == {spec.deployment_id: 2}
            assert {s.url for s in second.observe(spec.deployment_id)} == urls
            before = await asyncio.to_thread(apps.read_namespaced_deployment, name, namespace)
            # Idempotent: the same desired state writes nothing.
            await second.apply(spec, 2, resources=resources)
            after = await asyncio.to_thread(apps.read_namespaced_deployment, name, namespace)
            assert after.metadata.resource_version == before.metadata.resource_version
            listed = await asyncio.to_thread(apps.list_namespaced_deployment, namespace)
            assert [d.metadata.name for d in listed.items] == [name]
            # An orphan (its bdn deployment is gone) is pruned; the kept one stays.
            orphan = ReplicaSpec(model_id="m2abcdef", deployment_id="oldabcde",
                                 deployment_name="deployment-0", model_dir=str(folder))
            await second.apply(orphan, 0, resources=resources)
            assert await second.prune({spec.deployment_id}) == ["oldabcde"]
            listed = await asyncio.to_thread(apps.list_namespaced_deployment, namespace)
            assert [d.metadata.name for d in listed.items] == [name]

            # Scale to zero: no pods, the Deployment stays (at 0).
            await second.apply(spec, 0, resources=resources)
            await second.wait_ready(spec.deployment_id, 0, READY_TIMEOUT_S)
            dep = await asyncio.to_thread(apps.read_namespaced_deployment, name, namespace)
            assert dep.spec.replicas == 0
            # And back from zero.
            await second.apply(spec, 1, resources=resources)
            await second.wait_ready(spec.deployment_id, 1, READY_TIMEOUT_S)

            # Delete: the Deployment and its pods are gone.
            await second.remove(spec.deployment_id)
            assert second.observe(spec.deployment_id) == []
            with pytest.raises(ApiException) as info:
                await asyncio.to_thread(apps.read_namespaced_deployment, name, namespace)
            assert info.value.status == 404
            left = (await asyncio.to_thread(core.list_namespaced_pod, namespace)).items
            assert left == []
        finally:
            await second.close()
    finally:
        await first.close()


async def test_pods_that_cannot_run_are_reported_with_the_reason(
        lab: Lab, namespace: str) -> None:
    folder = model_folder(lab.node_root / "mounts" / namespace / "broken")
    (folder / "model" / "model.py").write_text(
        "class Model:\n    def __init__(self, **kw): pass\n"
        "    def load(self): raise RuntimeError('load failed on purpose')\n")
    crashing = ReplicaSpec(model_id="m4abcdef", deployment_id="d4abcdef",
                           deployment_name="deployment-1", model_dir=str(folder))
    nowhere = ReplicaSpec(model_id="m4abcdef", deployment_id="d5abcdef",
                          deployment_name="deployment-2", model_dir=str(folder))
    b = backend(lab, namespace)
    failed, unscheduled = asyncio.Event(), asyncio.Event()
    errors: list[str] = []

    def on_change(status: Any) -> None:
        if status.error:
            errors.append(status.error)
        if status.deployment_id == crashing.deployment_id and status.state == "failed":
            failed.set()
        if status.deployment_id == nowhere.deployment_id and status.error and \
                "not scheduled" in status.error:
            unscheduled.set()

    b.subscribe(on_change)
    try:
        await b.apply(crashing, 1, resources={"accelerator": "L4"})
        # No stand-in node has an H100: the scheduler says so, and so does the status.
        await b.apply(nowhere, 1, resources={"accelerator": "H100"})
        await asyncio.wait_for(failed.wait(), READY_TIMEOUT_S)
        await asyncio.wait_for(unscheduled.wait(), READY_TIMEOUT_S)
        assert any("exited with status 3" in e for e in errors), errors
        assert any("nvidia.com/gpu" in e or "node" in e for e in errors
                   if "not scheduled" in e), errors
        # Retiring a pod marks it to go first on scale-down, and the count follows.
        (pod,) = b.observe(nowhere.deployment_id)
        await b.apply(nowhere, 0, retire=[pod.id], resources={"accelerator": "H100"})
        await b.wait_ready(nowhere.deployment_id, 0, READY_TIMEOUT_S)
        await b.remove(crashing.deployment_id)
        await b.remove(nowhere.deployment_id)
        assert b.adopted() == {}
    finally:
        await b.close()


async def test_a_pod_runs_the_real_bdn_serve(lab: Lab, namespace: str) -> None:
    """The pod's command is ``bdn serve MODEL_DIR --listen $(BDN_POD_IP):PORT`` itself:
    it binds the pod's own address and is found ready through /health/ready."""
    folder = model_folder(lab.node_root / "mounts" / namespace / "served")
    (folder / "config.yaml").write_text("model_name: served\nweights: []\n")
    b = KubernetesBackend(KubeBackendOptions(
        namespace=namespace, kubeconfig=str(lab.cluster.kubeconfig), image="bdn-test:1",
        command=(sys.executable, "-m", "bdn.cli", "serve"),
        agent_socket_dir=str(lab.node_root / "run"),
        node_weights_dir=str(lab.node_root / "mounts"), termination_grace_s=5))
    spec = ReplicaSpec(model_id="m7abcdef", deployment_id="d7abcdef",
                       deployment_name="deployment-1", model_dir=str(folder))
    try:
        await b.apply(spec, 1, resources={"accelerator": "L4"})
        await b.wait_ready(spec.deployment_id, 1, READY_TIMEOUT_S)
        (ready,) = b.observe(spec.deployment_id)
        answer = await asyncio.to_thread(post_json, f"{ready.url}/predict", {"y": 2})
        assert answer["input"] == {"y": 2}
        await b.remove(spec.deployment_id)
    finally:
        await b.close()
