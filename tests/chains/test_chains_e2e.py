"""Chains on a real control plane on loopback: ``bdn chains push``, then invoke.

Replicas are real ``bdn serve`` processes running the generated chainlet folders; the
chainlets call each other through the control server's router. Nothing is mocked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.chains.test_chains_local import EXAMPLES
from tests.support.control import API_KEY, ControlServer
from tests.support.procs import bdn_command

pytestmark = pytest.mark.slow

PUSH_TIMEOUT_S = 300


def push(server: ControlServer, tmp_path: Path, example: str, *extra: str) -> dict[str, Any]:
    folder = tmp_path / example
    folder.mkdir(parents=True)
    shutil.copy(EXAMPLES / f"{example}.py", folder / f"{example}.py")
    out = subprocess.run(
        bdn_command("chains", "push", str(folder / f"{example}.py"), "--server", server.url,
                    "--api-key", API_KEY, *extra),
        capture_output=True, text=True, timeout=PUSH_TIMEOUT_S)
    assert out.returncode == 0, (out.stdout, out.stderr, server.proc.output[-3000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_remote(server: ControlServer, path: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> Any:
    return server.call("POST", path, body, headers=headers, timeout_s=PUSH_TIMEOUT_S)


def wait_promoted(server: ControlServer, answer: dict[str, Any], env: str) -> None:
    """Environment endpoints answer 404 until every chainlet's promotion moved traffic."""
    for target in answer["deployment"]["chainlets"].values():
        path = f"/v1/models/{target['model_id']}/environments/{env}"
        server.wait_for(f"{path} to be promoted", lambda p=path, t=target: (
            server.ok("GET", p).get("current_deployment") or {}).get("id")
            == t["deployment_id"], timeout_s=PUSH_TIMEOUT_S)


def test_hello_chain_pushed_and_invoked(server: ControlServer, tmp_path: Path) -> None:
    answer = push(server, tmp_path, "hello")
    chain_id = answer["id"]
    assert answer["environment"] == "production"
    assert sorted(answer["deployment"]["chainlets"]) == ["HelloWorld", "RandInt"]
    wait_promoted(server, answer, "production")
    r = run_remote(server, f"/chains/{chain_id}/production/run_remote", {"max_value": 4})
    assert r.status == 200, r.body
    text = r.json()
    n = text.count("Hello World! ")
    assert 1 <= n <= 4 and text == "Hello World! " * n
    dep_id = answer["deployment"]["id"]
    for path, headers in [(f"/chains/{chain_id}/deployment/{dep_id}/run_remote", None),
                          ("/production/run_remote", {"Host": f"chain-{chain_id}.local"})]:
        r = run_remote(server, path, {"max_value": 1}, headers)
        assert (r.status, r.json()) == (200, "Hello World! "), r.body
    # Each chainlet is an ordinary deployment with its own model.
    models = {m["name"] for m in server.ok("GET", "/v1/models")["models"]}
    assert {"hello-world--hello-world", "hello-world--rand-int"} <= models


def test_poems_chain_development(server: ControlServer, tmp_path: Path) -> None:
    answer = push(server, tmp_path, "poems", "--name", "poems", "--development")
    r = run_remote(server, f"/chains/{answer['id']}/development/run_remote",
                   {"words": ["bird", "plane"]})
    assert (r.status, r.json()) == (200, ["a poem about bird", "a poem about plane"]), r.body


def test_error_bubbles_up_as_documented(server: ControlServer, tmp_path: Path) -> None:
    answer = push(server, tmp_path, "itest_chain", "--development")
    path = f"/chains/{answer['id']}/development/run_remote"
    r = run_remote(server, path, {"length": 5})
    assert (r.status, r.json()) == (200, 10), r.body
    r = run_remote(server, path, {"length": 100})
    assert r.status == 500, r.body
    error = r.json()["error"]
    assert error["exception_cls_name"] == "ValueError"
    assert error["chainlet"] == "ItestChain"
    message = error["exception_message"]
    assert "Error in dependency Chainlet `TextToNum`" in message
    assert "Error in dependency Chainlet `TextReplicator`" in message
    assert "Chainlet-Traceback (most recent call last):" in message
    assert message.rstrip().endswith("ValueError: This input is too long: 100.")
    assert any(f["name"] == "run_remote" for f in error["user_stack_trace"])


def test_fan_out_runs_in_parallel(server: ControlServer, tmp_path: Path) -> None:
    # Each Worker call waits until all 8 have arrived (fanout.py): 8 sequential calls
    # would time out in the first one, so an answer means they ran at once.
    answer = push(server, tmp_path, "fanout", "--development")
    r = run_remote(server, f"/chains/{answer['id']}/development/run_remote", {"n": 8})
    assert (r.status, r.json()) == (200, [i * i for i in range(8)]), r.body


def test_dependency_scales_to_zero_and_cold_starts(server: ControlServer,
                                                   tmp_path: Path) -> None:
    answer = push(server, tmp_path, "hello", "--name", "hello-zero", "--development")
    path = f"/chains/{answer['id']}/development/run_remote"
    assert run_remote(server, path, {"max_value": 1}).json() == "Hello World! "
    dep = answer["deployment"]["chainlets"]["RandInt"]
    model_id, dep_id = dep["model_id"], dep["deployment_id"]
    server.ok("PATCH", f"/v1/models/{model_id}/deployments/{dep_id}/autoscaling_settings",
              {"scale_down_delay": 0, "autoscaling_window": 10})
    server.wait_for("RandInt to scale to zero", lambda: server.deployment(
        model_id, dep_id)["active_replica_count"] == 0 and server.deployment(
        model_id, dep_id)["desired_replica_count"] == 0, timeout_s=120)
    started = time.monotonic()
    r = run_remote(server, path, {"max_value": 1})
    assert (r.status, r.json()) == (200, "Hello World! "), r.body
    info = server.deployment(model_id, dep_id)
    assert len(info["cold_start_seconds"]) == 2, info
    assert time.monotonic() - started < PUSH_TIMEOUT_S


def test_binary_io_and_custom_errors(server: ControlServer, tmp_path: Path) -> None:
    import urllib.request

    import msgpack
    import numpy as np

    answer = push(server, tmp_path, "binaryio", "--development")
    url = f"{server.url}/chains/{answer['id']}/development/run_remote"
    numbers = np.arange(6, dtype=np.float64).reshape(3, 2)
    # As the docs' binary client sends it: the model's python dump, msgpack'ed.
    body = {"data": {"some_numbers": {"shape": [3, 2], "dtype": "<f8",
                                      "data": numbers.tobytes()},
                     "other_field": "Example"}, "text": "hi"}

    def call(text: str) -> dict[str, Any]:
        req = urllib.request.Request(
            url, data=msgpack.packb({**body, "text": text}, use_bin_type=True),
            method="POST", headers={"Content-Type": "application/octet-stream",
                                    "Authorization": f"Api-Key {API_KEY}"})
        with urllib.request.urlopen(req, timeout=PUSH_TIMEOUT_S) as resp:
            assert resp.headers.get_content_type() == "application/octet-stream"
            return dict(msgpack.unpackb(resp.read(), raw=False))

    out = call("hi")
    assert out["other_field"] == "HI"
    arr = out["some_numbers"]
    import base64
    got = np.frombuffer(base64.b64decode(arr["data_b64"]), dtype=arr["dtype"]).reshape(
        arr["shape"])
    assert np.array_equal(got, numbers + 10)
    # A custom exception class cannot be resolved by the caller: GenericRemoteException.
    assert call("custom")["other_field"] == "generic: ShoutError: (showing chained " \
        "remote errors, root error at the bottom)"


def test_streaming_through_a_dependency(server: ControlServer, tmp_path: Path) -> None:
    answer = push(server, tmp_path, "streaming", "--development")
    r = run_remote(server, f"/chains/{answer['id']}/development/run_remote",
                   {"text": "one two three"})
    assert (r.status, r.body) == (200, b"ONE\nTWO\nTHREE\n")


def test_environment_push_and_second_push(server: ControlServer, tmp_path: Path) -> None:
    first = push(server, tmp_path / "a", "hello", "--name", "hello-env",
                 "--environment", "staging")
    assert first["environment"] == "staging"
    wait_promoted(server, first, "staging")
    path = f"/chains/{first['id']}/environments/staging/run_remote"
    assert run_remote(server, path, {"max_value": 1}).json() == "Hello World! "
    second = push(server, tmp_path / "b", "hello", "--name", "hello-env",
                  "--environment", "staging")
    assert second["id"] == first["id"]
    old = {t["deployment_id"] for t in first["deployment"]["chainlets"].values()}
    new = {t["deployment_id"] for t in second["deployment"]["chainlets"].values()}
    assert second["deployment"]["id"] != first["deployment"]["id"] and not old & new
    wait_promoted(server, second, "staging")
    assert run_remote(server, path, {"max_value": 1}).json() == "Hello World! "
    chain = server.ok("GET", f"/v1/chains/{first['id']}")
    assert len(chain["deployments"]) == 2


def test_development_repush_patches_code(server: ControlServer, tmp_path: Path) -> None:
    first = push(server, tmp_path, "hello", "--name", "hello-dev", "--development")
    path = f"/chains/{first['id']}/development/run_remote"
    assert run_remote(server, path, {"max_value": 1}).json() == "Hello World! "
    source = tmp_path / "hello" / "hello.py"
    source.write_text(source.read_text().replace('"Hello World! "', '"Hi! "'))
    out = subprocess.run(
        bdn_command("chains", "push", str(source), "--server", server.url, "--api-key",
                    API_KEY, "--name", "hello-dev", "--development"),
        capture_output=True, text=True, timeout=PUSH_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    second = json.loads(out.stdout.strip().splitlines()[-1])
    # The same development deployments, patched: no new chain or chainlet deployments.
    assert second["deployment"] == {**first["deployment"],
                                    "created_at": second["deployment"]["created_at"]}
    server.wait_for("the patched code to answer", lambda: run_remote(
        server, path, {"max_value": 1}).json() == "Hi! ", timeout_s=PUSH_TIMEOUT_S)


def test_bad_input_is_refused_naming_the_field(server: ControlServer, tmp_path: Path) -> None:
    answer = push(server, tmp_path, "hello", "--name", "hello-input", "--development")
    path = f"/chains/{answer['id']}/development/run_remote"
    r = run_remote(server, path, {"max_value": "many"})
    assert r.status == 400, r.body
    assert [e["loc"] for e in r.json()["errors"]] == [["max_value"]]
    r = run_remote(server, path, {"max_value": 1, "extra": 2})
    assert r.status == 400 and r.json()["errors"][0]["loc"] == ["extra"], r.body


WEIGHTS_CHAIN = '''
import truss_chains as chains


class Lookup(chains.ChainletBase):
    remote_config = chains.RemoteConfig(assets=chains.Assets(weights=[
        {{"source": {source!r}, "mount_location": "/app/weights/table"}}]))

    async def run_remote(self, key: str) -> str:
        return key.upper()


@chains.mark_entrypoint
class Front(chains.ChainletBase):
    def __init__(self, lookup=chains.depends(Lookup)) -> None:
        self._lookup = lookup

    async def run_remote(self, key: str) -> str:
        return "front:" + await self._lookup.run_remote(key)
'''


def test_chainlet_weights_come_through_the_agent(server: ControlServer,
                                                 tmp_path: Path) -> None:
    table = tmp_path / "table"
    table.mkdir()
    (table / "table.bin").write_bytes(bytes(range(256)) * 64)
    src = tmp_path / "weights_chain"
    src.mkdir()
    (src / "weights_chain.py").write_text(WEIGHTS_CHAIN.format(source=f"file://{table}"))
    out = subprocess.run(
        bdn_command("chains", "push", str(src / "weights_chain.py"), "--server", server.url,
                    "--api-key", API_KEY, "--development"),
        capture_output=True, text=True, timeout=PUSH_TIMEOUT_S)
    assert out.returncode == 0, (out.stderr, server.proc.output[-3000:])
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    r = run_remote(server, f"/chains/{answer['id']}/development/run_remote", {"key": "k"})
    assert (r.status, r.json()) == (200, "front:K"), r.body
    target = answer["deployment"]["chainlets"]["Lookup"]
    dep = server.deployment(target["model_id"], target["deployment_id"])
    assert dep["weights"][0]["manifest"].startswith("b3:")
    assert sum(dep["last_cold_start"]["bytes_by_tier"].values()) >= 256 * 64, dep


def test_chainlet_replicas_hold_a_key_that_only_calls_chains(server: ControlServer,
                                                             tmp_path: Path) -> None:
    """Chainlet code gets a transport key for run_remote calls, never the admin key: with
    it, user code could not list, push, promote or delete anything of anyone's."""
    answer = push(server, tmp_path, "transport_key", "--development")
    path = f"/chains/{answer['id']}/development/run_remote"
    r = run_remote(server, path, {})
    assert r.status == 200, r.body
    seen = r.json()
    key = seen["transport_key"]
    assert key and key != API_KEY and not seen["admin_key_seen"]
    assert server.call("POST", path, {}, key=key, timeout_s=PUSH_TIMEOUT_S).status == 200
    for method, admin_path in [("GET", "/v1/models"), ("GET", "/v1/chains"),
                               ("POST", "/v1/chains")]:
        r = server.call(method, admin_path, {} if method == "POST" else None, key=key)
        assert r.status == 401, (admin_path, r.status, r.body)
