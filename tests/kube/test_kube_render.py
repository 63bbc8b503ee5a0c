"""What the Kubernetes backend asks the API server for (pure: no cluster needed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from control.backends import ReplicaSpec
from control.errors import BackendError, RequestError
from control.kube import (
    KubeBackendOptions,
    KubernetesBackend,
    Rollout,
    label_value,
    object_name,
    rollout_kwargs,
)
from tests.support.procs import free_port

WEIGHTS = "/var/lib/bdn/mounts"


@dataclass(frozen=True)
class PushedSpec:
    """A pushed deployment as the push-to-ready spec carries it (code + resources)."""

    model_id: str = "m3abcdef"
    deployment_id: str = "d3abcdef"
    deployment_name: str = "deployment-3"
    model_dir: str = ""
    revision: int = 4
    code: str | None = "b3:" + "ab" * 32
    weights: tuple[dict[str, str], ...] = (
        {"source": "hf://acme/tiny@main", "mount_location": "/app/weights/tiny",
         "ref": "b3:" + "cd" * 32},)
    environment: str | None = "production"
    env: tuple[tuple[str, str], ...] = (("GREETING", "hi"), ("BDN_SECRET_hf_token", "s3cr3t"))
    resources: Any = None


def render(spec: Any, replicas: int = 1, **kw: Any) -> dict[str, Any]:
    options = KubeBackendOptions(namespace="lab", image="registry.example/bdn:1")
    return KubernetesBackend(options).render(spec, replicas, **kw)


def pod_of(body: dict[str, Any]) -> dict[str, Any]:
    return dict(body["spec"]["template"]["spec"])


def test_a_pushed_deployment_gets_its_code_and_weights_from_the_node_agent() -> None:
    spec = PushedSpec(resources={"accelerator": "H100:2"})
    body = render(spec)
    pod = pod_of(body)
    assert "initContainers" not in pod
    (main,) = pod["containers"]
    # The pod's entrypoint starts the pulls through the agent's socket, serves, and
    # releases them when the pod stops (control/pod.py).
    assert main["args"] == [
        "serve-delivered", "--agent-socket", "/run/bdn/agent.sock", "--mounts-root", WEIGHTS,
        "--deployment", "d3abcdef", "--code", spec.code,
        "--weights", json.dumps(list(spec.weights), sort_keys=True),
        "--listen", "$(BDN_POD_IP):8080"]
    assert "command" not in main  # the image's entrypoint: bdn
    # Only the agent's socket folder and the node's weights folder come from the host.
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"/run/bdn", WEIGHTS}
    weights_mount = next(m for m in main["volumeMounts"] if m["name"] == "weights")
    assert weights_mount["readOnly"] is True
    # Secret values never enter the Deployment; they come from a Secret.
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["GREETING"] == "hi" and env["BDN_ENVIRONMENT"] == "production"
    assert not any(k.startswith("BDN_SECRET_") for k in env)
    assert "s3cr3t" not in repr(body)
    assert main["envFrom"] == [{"secretRef": {"name": "bdn-model-secrets", "optional": True}}]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"bdn.dev/accelerator": "H100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert main["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    labels = body["spec"]["template"]["metadata"]["labels"]
    assert labels["bdn.dev/revision"] == "4"
    assert body["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "bdn-control", "bdn.dev/deployment": "d3abcdef"}
    assert body["metadata"]["annotations"]["bdn.dev/instance-type"] == "H100:2"


@pytest.mark.parametrize("model_dir", [
    "/srv/control/models/echo",             # the control plane's own files
    f"{WEIGHTS}/../../../etc",              # climbs out
    "relative/echo",
    f"{WEIGHTS}-other/echo",                # a sibling with the same prefix
])
def test_a_folder_outside_the_nodes_weights_is_refused(model_dir: str) -> None:
    spec = ReplicaSpec(model_id="m", deployment_id="d", deployment_name="x",
                       model_dir=model_dir)
    with pytest.raises(BackendError, match="not in the node's weights folder"):
        render(spec)


def test_a_folder_inside_the_nodes_weights_is_served_as_is() -> None:
    spec = ReplicaSpec(model_id="m", deployment_id="d", deployment_name="x",
                       model_dir=f"{WEIGHTS}/models/echo")
    pod = pod_of(render(spec))
    assert "initContainers" not in pod
    assert pod["containers"][0]["args"][:2] == ["serve", f"{WEIGHTS}/models/echo"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["requests"]
    assert "nodeSelector" not in pod


def test_the_rendering_hash_ignores_the_replica_count_and_follows_the_spec() -> None:
    spec = PushedSpec()
    a, b = render(spec, 1), render(spec, 5)
    key = "bdn.dev/spec-hash"
    assert a["metadata"]["annotations"][key] == b["metadata"]["annotations"][key]
    c = render(PushedSpec(revision=5))
    assert c["metadata"]["annotations"][key] != a["metadata"]["annotations"][key]


@pytest.mark.parametrize(("rollout", "surge", "unavailable"), [
    (None, "25%", 0),
    (Rollout.from_percent(50, 0), "50%", "0%"),
    (Rollout("1", "0"), 1, 0),
    (Rollout("0", "10%"), 0, "10%"),
])
def test_rollout_steps_come_from_the_promotion_settings(
        rollout: Rollout | None, surge: Any, unavailable: Any) -> None:
    strategy = render(PushedSpec(), rollout=rollout)["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": surge, "maxUnavailable": unavailable}


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_surge": "0", "max_unavailable": "0%"}, "max_surge"),
    ({"max_surge": "150%"}, "max_surge"),
    ({"max_unavailable": "-1"}, "max_unavailable"),
])
def test_bad_rollouts_name_the_field(kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(RequestError) as info:
        Rollout(**kwargs)
    assert info.value.field == field


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"namespace": "Not_A_Namespace"}, "namespace"),
    ({"port": 0}, "port"),
    ({"agent_socket_dir": "run/bdn"}, "agent_socket_dir"),
    ({"image": ""}, "image"),
])
def test_bad_options_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as info:
        KubeBackendOptions(**{"image": "registry.example/bdn:1", **kwargs})
    assert info.value.field == field


def test_names_and_labels_are_valid_kubernetes_names() -> None:
    assert object_name("m2abcdef", "d2abcdef") == "bdn-m2abcdef-d2abcdef"
    long = object_name("M" * 40, "deployment_" + "x" * 40)
    assert len(long) <= 57 and long.startswith("bdn-m") and long == long.lower()
    assert object_name("M" * 40, "deployment_" + "x" * 40) == long  # stable
    assert label_value("abc") == "abc"
    odd = label_value("a b/" + "c" * 80)
    assert len(odd) <= 63 and " " not in odd and "/" not in odd


def test_bad_resources_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(RequestError) as info:
        render(PushedSpec(resources={"accelerator": "V100"}))
    assert info.value.field == "resources.accelerator"


async def test_an_unreachable_api_server_is_a_backend_error_and_start_retries(
        tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n"
        "    insecure-skip-tls-verify: true\n"
        "users:\n- name: u\n  user:\n    token: not-a-real-token\n"
        "contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n"
        "current-context: c\n")
    b = KubernetesBackend(KubeBackendOptions(namespace="lab", image="registry.example/bdn:1",
                                             kubeconfig=str(kubeconfig)))
    spec = ReplicaSpec(model_id="m", deployment_id="d", deployment_name="x",
                       model_dir=f"{WEIGHTS}/models/echo")
    try:
        for _ in range(2):  # a failed start leaves the backend able to try again
            with pytest.raises(BackendError) as info:
                await b.apply(spec, 1)
            assert "kubernetes (lab)" in str(info.value)
            assert "not-a-real-token" not in str(info.value)
    finally:
        await b.close()


def test_a_rolling_promotion_passes_its_steps_to_kubernetes_only() -> None:
    from control.backends import LocalProcessBackend

    kube = KubernetesBackend(KubeBackendOptions(namespace="lab", image="r.example/bdn:1"))
    assert rollout_kwargs(kube, 50, 0) == {"rollout": Rollout("50%", "0%")}
    assert rollout_kwargs(LocalProcessBackend(), 50, 0) == {}
    body = render(PushedSpec(), 2, **rollout_kwargs(kube, 50, 0))
    assert body["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "50%",
                                                         "maxUnavailable": "0%"}
