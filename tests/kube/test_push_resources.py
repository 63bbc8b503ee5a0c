"""``resources:`` at push: refused with a 400 naming the field, else reported as the
deployment's ``instance_type_name`` (the local backend too). No cluster needed: a real
control server with the local-process backend."""

from __future__ import annotations

import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.resources import instance_type_for
from tests.support.control import API_KEY, ControlServer
from tests.support.procs import bdn_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlServer]:
    s = ControlServer(tmp_path_factory.mktemp("state"), replica="standin")
    try:
        yield s
    finally:
        s.stop()


def folder(root: Path, resources: str, weights: str = "weights: []") -> Path:
    (root / "model").mkdir(parents=True)
    (root / "config.yaml").write_text(f"model_name: res\n{weights}\n{resources}\n")
    (root / "model" / "model.py").write_text(
        "class Model:\n    def load(self): pass\n    def predict(self, x): return x\n")
    return root


@pytest.mark.parametrize(("resources", "field"), [
    ("resources: {accelerator: Z9}", "resources.accelerator"),
    ("resources: {accelerator: 'L4:99'}", "resources.accelerator"),
    ("resources: {cpu: lots}", "resources.cpu"),
    ("resources: {memory: 12 parsecs}", "resources.memory"),
    ("resources: {gpu: L4}", "resources.gpu"),
    ("resources: {instance_type: 'L4:1x1'}", "resources.instance_type"),
    ("resources: {use_gpu: true}", "resources.accelerator"),
    ("resources: [L4]", "resources"),
])
def test_a_bad_resources_section_is_refused_naming_the_field(
        srv: ControlServer, tmp_path: Path, resources: str, field: str) -> None:
    model_id = srv.ok("POST", "/v1/models", {"name": f"bad-{abs(hash(resources))}"})["id"]
    answer = srv.call("POST", f"/v1/models/{model_id}/deployments",
                      {"model_dir": str(folder(tmp_path / "m", resources))})
    assert answer.status == 400, answer.body
    assert answer.json()["error"].startswith(f"{field}: "), answer.json()
    assert srv.ok("GET", f"/v1/models/{model_id}/deployments")["deployments"] == []


@pytest.mark.parametrize(("resources", "name"), [
    ("resources: {accelerator: L4}", "L4:4x16"),
    ("resources: {accelerator: 'H100:2'}", "H100:2"),
    ("", instance_type_for(None).name),
])
def test_the_chosen_instance_type_is_reported(srv: ControlServer, tmp_path: Path,
                                              resources: str, name: str) -> None:
    model_id = srv.ok("POST", "/v1/models", {"name": f"ok-{abs(hash(resources))}"})["id"]
    dep = srv.ok("POST", f"/v1/models/{model_id}/deployments",
                 {"model_dir": str(folder(tmp_path / "m", resources))})
    assert dep["instance_type_name"] == name
    assert srv.deployment(model_id, dep["id"])["instance_type_name"] == name


def test_a_pushed_folder_is_checked_before_its_weights_are_mirrored(
        srv: ControlServer, tmp_path: Path) -> None:
    # The weights' source does not exist: had the mirror run first, it would say so.
    bad = folder(tmp_path / "bad", "resources: {accelerator: Z9}", textwrap.dedent(f"""\
        weights:
          - source: file://{tmp_path / 'nowhere'}
            mount_location: /app/weights/w"""))
    env = {**os.environ, "HOME": str(tmp_path), "BDN_API_KEY": API_KEY,
           "BDN_CONTROL_URL": srv.url}
    done = subprocess.run(bdn_command("push", str(bad), "--model-name", "pushed-bad"),
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "resources.accelerator: " in done.stderr, done.stderr
    good = folder(tmp_path / "good", "resources: {accelerator: L4}")
    done = subprocess.run(bdn_command("push", str(good), "--model-name", "pushed-good"),
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model = next(m for m in srv.ok("GET", "/v1/models")["models"]
                 if m["name"] == "pushed-good")
    (dep,) = srv.ok("GET", f"/v1/models/{model['id']}/deployments")["deployments"]
    assert dep["instance_type_name"] == "L4:4x16"
