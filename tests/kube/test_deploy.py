"""deploy/: the kustomize overlays build, name one image, keep Secrets out of the repo,
and are accepted by a real API server; the agent DaemonSet lands on the GPU nodes; the
control plane's Role is enough for the Kubernetes backend and no more.

Rendering needs ``kubectl kustomize`` (any kubectl from 1.14; Debian's
``kubernetes-client`` works); the tests skip with one line without it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from control.backends import ReplicaSpec
from control.kube import KubeBackendOptions, KubernetesBackend
from tests.support.kube import NODES, Lab

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = ("lab", "cluster")
REPLICA_STANDIN = Path(__file__).resolve().parents[1] / "control" / "replica_standin.py"
READY_TIMEOUT_S = 120.0
SECRET_INPUTS = {"store.env": "BDN_STORE=s3://test-bucket/bdn\n",
                 "api-keys": "test-key-0123456789\n",
                 "mirror-keys.yaml": "keys: []\n"}


def kubectl() -> str:
    exe = os.environ.get("BDN_KUBECTL") or shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl absent: apt-get install kubernetes-client (or any kubectl "
                    ">= 1.14) to render deploy/ with kustomize")
    return exe


def kustomize(overlay: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def deploy_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/ with the Secret inputs an operator would write (never in the repo)."""
    root = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(DEPLOY, root)
    for overlay in OVERLAYS:
        secrets = root / "overlays" / overlay / "secrets"
        assert not secrets.exists(), "Secret inputs must not be committed"
        secrets.mkdir()
        for name, text in SECRET_INPUTS.items():
            (secrets / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def rendered(deploy_copy: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for overlay in OVERLAYS:
        done = kustomize(deploy_copy / "overlays" / overlay)
        assert done.returncode == 0, done.stderr
        out[overlay] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return out


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def test_the_base_names_no_namespace_and_ships_no_secret() -> None:
    for path in (DEPLOY / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") == "Kustomization" or "kind" not in doc:
                continue
            assert "namespace" not in doc.get("metadata", {}), path
            assert doc["kind"] != "Secret", f"{path} ships a Secret"
    assert "namespace" not in yaml.safe_load((DEPLOY / "base" / "kustomization.yaml")
                                             .read_text())


def test_an_overlay_without_its_secret_inputs_refuses_to_build(tmp_path: Path) -> None:
    root = tmp_path / "deploy"
    shutil.copytree(DEPLOY, root)
    done = kustomize(root / "overlays" / "lab")
    assert done.returncode != 0
    assert "store.env" in done.stderr or "secrets" in done.stderr, done.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_image_consistent_labels_and_locked_down_pods(
        rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    base = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    (image,) = base["images"]
    reference = f"{image['newName']}:{image['newTag']}"
    docs = rendered[overlay]
    namespace = {"lab": "bdn-lab", "cluster": "bdn"}[overlay]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment",
            "StatefulSet", "DaemonSet", "PodDisruptionBudget", "Secret"} <= kinds
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] != "Namespace":
            assert meta["namespace"] == namespace, meta
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "bdn", meta
        assert labels.get("app.kubernetes.io/instance") == namespace, meta
        if doc["kind"] not in ("Namespace", "Secret"):
            assert labels.get("app.kubernetes.io/name", "").startswith("bdn"), meta
            assert "app.kubernetes.io/component" in labels, meta
        if doc["kind"] == "Secret":
            assert doc.get("data"), f"{meta['name']} is empty"
            assert re.fullmatch(r"bdn-[a-z-]+-[a-z0-9]{10}", meta["name"]), meta["name"]
        for c in containers(doc):
            assert c["image"] == reference, (meta["name"], c["image"])
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (meta["name"], c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    agent = by_name[("DaemonSet", "bdn-agent")]
    ports = {p["name"]: p["containerPort"]
             for p in agent["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"metrics": 7470, "peer": 7471}
    pdb = by_name[("PodDisruptionBudget", "bdn-cache")]
    cache = by_name[("StatefulSet", "bdn-cache")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        cache["spec"]["template"]["metadata"]["labels"].items()
    control = by_name[("Deployment", "bdn-control")]["spec"]["template"]["spec"]
    assert control["serviceAccountName"] == "bdn-control"
    assert "--backend=kubernetes" in control["containers"][0]["args"]
    # Nothing but the control plane mounts an API token.
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod and doc["metadata"]["name"] != "bdn-control":
            assert pod["serviceAccountName"] == "bdn"
    role = by_name[("Role", "bdn-control")]
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments"],
         "verbs": ["get", "list", "create", "update", "delete"]},
        {"apiGroups": [""], "resources": ["pods"],
         "verbs": ["get", "list", "watch", "patch", "delete"]}]


def test_the_dockerfile_copies_what_exists_and_runs_bdn() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    repo = DEPLOY.parent
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (repo / source).exists(), source
    assert 'ENTRYPOINT ["bdn"]' in text
    # Every package the wheel ships is copied in, and the install is pinned like make's.
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ")}
    shipped = {path.parent.name for path in repo.glob("*/__init__.py")
               if path.parent.name not in {"tests", "bench", "demo"}}
    assert shipped <= copied, shipped - copied
    assert "-c constraints.txt" in text
    extras = re.search(r"ARG EXTRAS=(\S+)", text)
    assert extras is not None
    pyproject = (repo / "pyproject.toml").read_text()
    assert f"\n{extras.group(1)} = [" in pyproject


def for_api_server_1_20(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The test API server (v1.20) predates policy/v1 (GA in 1.21); clusters of today no
    longer serve policy/v1beta1. The PDB's schema is the same in both."""
    out = []
    for doc in docs:
        if doc["kind"] == "PodDisruptionBudget" and doc["apiVersion"] == "policy/v1":
            doc = {**doc, "apiVersion": "policy/v1beta1"}
        out.append(doc)
    return out


def kubectl_apply(lab: Lab, docs: list[dict[str, Any]], *extra: str) -> str:
    done = subprocess.run(
        [kubectl(), "--kubeconfig", str(lab.cluster.kubeconfig), "apply", *extra, "-f", "-"],
        input=yaml.safe_dump_all(docs), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def installed(lab: Lab, rendered: dict[str, list[dict[str, Any]]]) -> Iterator[str]:
    """Both overlays accepted by a server-side dry-run; the lab overlay then applied."""
    for overlay in OVERLAYS:
        docs = for_api_server_1_20(rendered[overlay])
        namespaces = [d for d in docs if d["kind"] == "Namespace"]
        kubectl_apply(lab, namespaces)
        out = kubectl_apply(lab, docs, "--dry-run=server")
        assert "(server dry run)" in out
    kubectl_apply(lab, for_api_server_1_20(rendered["lab"]))
    yield "bdn-lab"


def test_the_agent_daemonset_runs_on_every_gpu_node(lab: Lab, installed: str) -> None:
    from kubernetes import client, watch

    apps, core = client.AppsV1Api(lab.api), client.CoreV1Api(lab.api)
    w = watch.Watch()
    status = None
    for ev in w.stream(apps.list_namespaced_daemon_set, installed,
                       field_selector="metadata.name=bdn-agent", timeout_seconds=120):
        status = ev["object"].status
        if status.desired_number_scheduled == len(NODES) and status.number_ready == len(NODES):
            w.stop()
    assert status is not None and status.number_ready == len(NODES), status
    pods = core.list_namespaced_pod(installed,
                                    label_selector="app.kubernetes.io/name=bdn-agent").items
    assert sorted(p.spec.node_name for p in pods) == sorted(NODES)


async def test_the_control_role_is_enough_for_the_backend(lab: Lab, installed: str) -> None:
    from kubernetes import client, watch

    core = client.CoreV1Api(lab.api)
    # The ServiceAccount's token (v1.20 writes it into a Secret).
    w = watch.Watch()
    secret_name = None
    for ev in w.stream(core.list_namespaced_service_account, installed,
                       field_selector="metadata.name=bdn-control", timeout_seconds=60):
        if ev["object"].secrets:
            secret_name = ev["object"].secrets[0].name
            w.stop()
    assert secret_name is not None
    import base64
    token = base64.b64decode(core.read_namespaced_secret(secret_name, installed)
                             .data["token"]).decode()
    # A stand-in for the control plane's own pod (unscheduled: no GPU toleration), whose
    # image the replicas must run.
    image = "registry.example/bdn:own"
    core.create_namespaced_pod(installed, {
        "metadata": {"name": "bdn-control-self"},
        "spec": {"containers": [{"name": "control", "image": image}]}})
    weights = lab.node_root / "mounts"
    folder = weights / installed / "echo"
    (folder / "model").mkdir(parents=True)
    (folder / "config.yaml").write_text("model_name: echo\n")
    (folder / "model" / "model.py").write_text(
        "class Model:\n    def __init__(self, **kw): pass\n    def load(self): pass\n"
        "    def predict(self, x): return x\n")
    sa_client = lab.cluster.api_client(token=token)
    b = KubernetesBackend(KubeBackendOptions(
        namespace=installed, own_pod="bdn-control-self",
        command=(sys.executable, str(REPLICA_STANDIN)),
        agent_socket_dir=str(lab.node_root / "run"), node_weights_dir=str(weights),
        termination_grace_s=5), api_client=sa_client)
    spec = ReplicaSpec(model_id="m6abcdef", deployment_id="d6abcdef",
                       deployment_name="deployment-1", model_dir=str(folder))
    try:
        await b.apply(spec, 2, resources={"accelerator": "L4"})
        await b.wait_ready(spec.deployment_id, 2, READY_TIMEOUT_S)
        first, second = b.observe(spec.deployment_id)
        # Retiring one of two: this API server (1.20) ignores pod-deletion-cost, so the
        # backend deletes the retired pod itself; the other one stays.
        await b.apply(spec, 1, retire=[first.id], resources={"accelerator": "L4"})
        await b.wait_ready(spec.deployment_id, 1, READY_TIMEOUT_S)
        assert [p.id for p in b.observe(spec.deployment_id)] == [second.id]
        await b.apply(spec, 0, retire=[second.id], resources={"accelerator": "L4"})
        await b.wait_ready(spec.deployment_id, 0, READY_TIMEOUT_S)
        apps = client.AppsV1Api(lab.api)
        dep = await asyncio.to_thread(apps.read_namespaced_deployment,
                                      "bdn-m6abcdef-d6abcdef", installed)
        assert dep.spec.template.spec.containers[0].image == image
        await b.remove(spec.deployment_id)
    finally:
        await b.close()
    # And no more than that: the control plane cannot read Secrets or create pods.
    auth = client.AuthorizationV1Api(lab.cluster.api_client(token=token))
    for verb, resource in (("list", "secrets"), ("create", "pods"),
                           ("patch", "deployments")):
        review = auth.create_self_subject_access_review({"spec": {"resourceAttributes": {
            "namespace": installed, "verb": verb, "resource": resource,
            "group": "apps" if resource == "deployments" else ""}}})
        assert review.status.allowed is False, (verb, resource)
