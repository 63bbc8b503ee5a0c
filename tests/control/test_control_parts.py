"""The smaller parts on their own: metrics text, option validation.

(The Kubernetes backend's rendering is tested in tests/kube/test_kube_render.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from control.api import ServerOptions, load_or_create_api_keys
from control.backends import LocalBackendOptions, ReplicaSpec
from control.controller import ControllerOptions
from control.errors import RequestError
from control.metrics import Histogram, Metrics


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    m = Metrics()
    h = m.cold_start = Histogram("bdn_cold_start_seconds", "help", (1.0, 5.0))
    labels = (("deployment_id", "d1"),)
    for v in (0.5, 2.0, 3.0, 9.0):
        h.observe(v, labels)
    text = m.render([])
    assert 'bdn_cold_start_seconds_bucket{deployment_id="d1",le="1.0"} 1.0' in text
    assert 'bdn_cold_start_seconds_bucket{deployment_id="d1",le="5.0"} 3.0' in text
    assert 'bdn_cold_start_seconds_bucket{deployment_id="d1",le="+Inf"} 4.0' in text
    assert 'bdn_cold_start_seconds_sum{deployment_id="d1"} 14.5' in text
    assert 'bdn_cold_start_seconds_count{deployment_id="d1"} 4.0' in text
    assert "# TYPE bdn_cold_start_seconds histogram" in text


def test_metrics_render_gauges_and_escape_labels() -> None:
    m = Metrics()
    m.requests.inc((("code", "200"),))
    m.requests.inc((("code", 'a"b\\c'),))
    text = m.render([("bdn_concurrent_requests", "in flight",
                      [((("deployment_id", "a"),), 3)])])
    assert "# TYPE bdn_concurrent_requests gauge" in text
    assert 'bdn_concurrent_requests{deployment_id="a"} 3.0' in text
    assert 'bdn_requests_total{code="200"} 1.0' in text
    assert 'bdn_requests_total{code="a\\"b\\\\c"} 1.0' in text


def test_options_are_validated_and_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(RequestError) as err:
        ControllerOptions(tick_interval_s=0)
    assert err.value.field == "tick_interval_s"
    with pytest.raises(RequestError) as err:
        ControllerOptions(max_queue=0)
    assert err.value.field == "max_queue"
    with pytest.raises(RequestError) as err:
        LocalBackendOptions(command=())
    assert err.value.field == "command"
    with pytest.raises(RequestError) as err:
        ServerOptions(state_dir=tmp_path, api_keys=())
    assert err.value.field == "api_keys"
    with pytest.raises(RequestError):
        ServerOptions(state_dir=tmp_path, api_keys=("short",))
    assert "secret-key-1" not in repr(ServerOptions(state_dir=tmp_path,
                                                    api_keys=("secret-key-1",)))


def test_a_generated_api_key_is_private_and_reused(tmp_path: Path) -> None:
    keys, source = load_or_create_api_keys(tmp_path, None, None)
    path = tmp_path / "api-key"
    assert source == str(path) and len(keys[0]) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_api_keys(tmp_path, None, None)[0] == keys
    assert load_or_create_api_keys(tmp_path, None, "from-env-123") == (("from-env-123",),
                                                                        "BDN_API_KEY")
    key_file = tmp_path / "keys"
    key_file.write_text("k1-aaaaaaaa\n\nk2-bbbbbbbb\n")
    assert load_or_create_api_keys(tmp_path, key_file, "ignored")[0] == ("k1-aaaaaaaa",
                                                                         "k2-bbbbbbbb")


def _bdn_containers() -> list[tuple[str, list[str]]]:
    """(manifest name, args) of every container in deploy/base that runs the bdn CLI."""
    found = []
    for path in sorted((Path(__file__).parents[2] / "deploy" / "base").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            pod = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                if c.get("args") and not c.get("command"):
                    found.append((f"{path.name}:{c['name']}", c["args"]))
    return found


def test_every_deploy_manifest_runs_a_valid_bdn_command() -> None:
    from bdn.cli import build_parser

    parsed = {name: build_parser().parse_args(args) for name, args in _bdn_containers()}
    assert {name: a.command for name, a in parsed.items()} == {
        "agent.yaml:agent": "agent", "cache.yaml:cache": "cache-server",
        "control.yaml:control": "control-server", "mirror.yaml:mirror": "mirror-server"}
    control = parsed["control.yaml:control"]
    assert control.handler.__name__ == "cmd_control_server"
    assert str(control.state_dir) == "/var/lib/bdn"
    # Replicas are pods: the flags select the Kubernetes backend in the pod's namespace.
    assert control.backend == "kubernetes" and control.namespace == "$(POD_NAMESPACE)"
    assert control.agent_socket_dir == "/run/bdn"
    assert control.node_weights_dir == "/var/lib/bdn/mounts"


def test_replica_environment_is_built_from_nothing() -> None:
    from control.backends import replica_environment

    spec = ReplicaSpec(model_id="m", deployment_id="d", deployment_name="n", model_dir="/x",
                       environment="staging",
                       env=(("GREETING", "hi"), ("BDN_SECRET_TOKEN", "t0k3n-value")))
    server_env = {"PATH": "/usr/bin", "HOME": "/home/op", "BDN_API_KEY": "k" * 20,
                  "BDN_SECRET_OTHER": "someone-elses", "AWS_SECRET_ACCESS_KEY": "x",
                  "BDN_ENVIRONMENT": "production"}
    env = replica_environment(spec, "d-1", server_env, [("BDN_PULL_EVENTS", "u")])
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/op"
    assert env["GREETING"] == "hi" and env["BDN_SECRET_TOKEN"] == "t0k3n-value"
    assert env["BDN_ENVIRONMENT"] == "staging" and env["BDN_REPLICA_ID"] == "d-1"
    assert env["BDN_PULL_EVENTS"] == "u"
    for leaked in ("BDN_API_KEY", "BDN_SECRET_OTHER", "AWS_SECRET_ACCESS_KEY"):
        assert leaked not in env
    # No environment: the variable is unset, whatever the server had.
    bare = replica_environment(ReplicaSpec("m", "d", "n", "/x"), "d-2", server_env)
    assert "BDN_ENVIRONMENT" not in bare
    # The spec's repr never shows the values it carries.
    assert "t0k3n-value" not in repr(spec)
