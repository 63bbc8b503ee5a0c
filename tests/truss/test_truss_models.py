"""Truss model folders run unchanged: the corpus under ``corpus/`` served by ``bdn serve``.

Each folder of ``corpus/`` is a Truss-style model written for these tests (no Truss code
copied), one per behaviour a real Truss model relies on: no ``__init__``, every
constructor-argument combination, async pre/post, sync and async generator streaming
(directly and through the control plane's router), pydantic input, ``packages/`` and
``external_package_dirs``, ``setup_environment``, an undeclared secret, pre/post outside
the ``predict_concurrency`` limit, Truss's folder layout keys and requirements. Every
folder is also checked to be one that ``truss`` itself accepts.

The corpus is copied into the test's ``tmp_path`` first (importing a model writes
``__pycache__``, and a test writes nothing outside its tmp_path). Steps of concurrent
requests are ordered by the event lines the model prints and by FIFOs it blocks on, never
by sleeping.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from serving.errors import ModelLoadError, SecretNotFound
from serving.runtime import ModelRuntime
from tests.support.procs import ServiceProcess, bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

CORPUS = Path(__file__).with_name("corpus")
FOLDERS = sorted(p.name for p in CORPUS.iterdir() if (p / "config.yaml").is_file())
READY = "BDN_READY"
ARGS = ("config", "data_dir", "secrets", "environment", "lazy_data_resolver")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(CORPUS, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture
def serve(corpus: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``bdn serve`` on a corpus folder; every server is stopped at teardown."""
    started: list[ServiceProcess] = []

    def start(name: str, env: dict[str, str] | None = None,
              ready: bool = True) -> ServiceProcess:
        proc = ServiceProcess(bdn_command("serve", str(corpus / name), "--listen",
                                          "127.0.0.1:0"), env=env)
        started.append(proc)
        if ready:
            proc.wait_line(READY)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def post(url: str, body: Any, path: str = "/predict") -> tuple[int, Any]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def open_stream(url: str, path: str, body: Any,
                headers: dict[str, str] | None = None
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request("POST", path, body=json.dumps(body),
                 headers={"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def release(fifo: Path) -> None:
    """Let a model blocked reading ``fifo`` go on (opening blocks until it reads)."""
    with open(fifo, "w") as f:
        f.write("go\n")


# -- the corpus is Truss's ---------------------------------------------------------------


@pytest.mark.parametrize("name", FOLDERS)
def test_every_corpus_folder_is_one_truss_accepts(name: str) -> None:
    from truss.base.truss_config import TrussConfig

    logging.getLogger("truss").setLevel(logging.ERROR)
    config = TrussConfig.from_yaml(CORPUS / name / "config.yaml")
    config.validate_forbid_extra()
    module = CORPUS / name / config.model_module_dir / config.model_class_filename
    assert module.is_file(), f"{name}: Truss would look for {module}"


# -- construction --------------------------------------------------------------------------


def test_a_model_without_init_gets_no_arguments(serve: Callable[..., ServiceProcess]) -> None:
    # Failed on main with "Model() takes no arguments": object.__init__'s signature has
    # **kwargs, so every argument was passed.
    proc = serve("no_init")
    assert post(proc.url, {"x": 1}) == (200, {"greeting": "hello", "echo": {"x": 1}})


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run ModelRuntime in this process without leaking its sys.path and module."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("BDN_ENVIRONMENT", raising=False)
    yield
    sys.modules.pop("bdn_user_model", None)


def _load(folder: Path, class_name: str) -> Any:
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["model_class_name"] = class_name
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rt = ModelRuntime(folder, device="cpu")
    rt.load()
    return rt


def test_every_constructor_argument_combination(corpus: Path, in_process: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder = corpus / "kwargs"
    names = [f"Model_{i:05b}" for i in range(2 ** len(ARGS))]
    names += ["Model", "ModelKeywordOnly"]
    for name in names:
        rt = _load(folder, name)
        model = rt.model
        assert sorted(model.received) == sorted(type(model).wants), name
        got = model.received
        if "config" in got:
            assert got["config"]["model_metadata"] == {"purpose": "constructor arguments"}
        if "data_dir" in got:
            assert got["data_dir"] == folder.resolve() / "data"
        if "environment" in got:
            assert got["environment"] is None, "no BDN_ENVIRONMENT: None, as in Truss"
        if "lazy_data_resolver" in got:
            assert got["lazy_data_resolver"].fetch() == folder.resolve() / "data"
        if "secrets" in got:
            assert list(got["secrets"]) == ["declared_token"]
    monkeypatch.setenv("BDN_ENVIRONMENT", json.dumps({"name": "staging", "id": "e1"}))
    rt = _load(folder, "ModelKeywordOnly")
    assert rt.model.received["environment"] == {"name": "staging", "id": "e1"}


def test_setup_environment_runs_before_load(serve: Callable[..., ServiceProcess],
                                            corpus: Path, in_process: None) -> None:
    env = {"name": "production"}
    proc = serve("setup_environment", env={"BDN_ENVIRONMENT": json.dumps(env)})
    assert post(proc.url, {}) == (200, [["init", env], ["setup_environment", env],
                                        ["load", None]])
    # With no environment known, Truss does not call it, and neither does bdn.
    rt = ModelRuntime(corpus / "setup_environment", device="cpu")
    rt.load()
    assert rt.model.events == [("init", None), ("load", None)]


# -- the request pipeline ------------------------------------------------------------------


def test_async_preprocess_and_postprocess(serve: Callable[..., ServiceProcess]) -> None:
    proc = serve("async_pre_post")
    assert post(proc.url, {"x": 2}) == (200, {"steps": ["pre", "predict", "post"], "x": 4})


def test_predict_alias_of_truss(serve: Callable[..., ServiceProcess]) -> None:
    proc = serve("no_init")
    assert post(proc.url, [1], path="/v1/models/model:predict") == \
        (200, {"greeting": "hello", "echo": [1]})


def test_pydantic_input_is_parsed_and_bad_input_is_400(
        serve: Callable[..., ServiceProcess]) -> None:
    proc = serve("pydantic_input")
    assert post(proc.url, {"prompt": "hi"}) == (200, {"text": "HI", "tokens": 16})
    status, body = post(proc.url, {"max_tokens": "many"})
    assert status == 400 and "Request" in body["error"]
    fields = sorted(e["loc"][0] for e in body["errors"])
    assert fields == ["max_tokens", "prompt"], body


def test_packages_and_external_package_dirs_are_importable(
        serve: Callable[..., ServiceProcess]) -> None:
    proc = serve("packages")
    assert post(proc.url, {"text": "hello"}) == (200, "shared:HELLO!")


def test_an_undeclared_secret_raises_as_in_truss(serve: Callable[..., ServiceProcess],
                                                 tmp_path: Path, in_process: None,
                                                 corpus: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "declared_token").write_text("s3cr3t-value-0123")
    (secrets_dir / "undeclared_token").write_text("other-value-4567")
    proc = serve("secrets", env={"BDN_SECRETS_DIR": str(secrets_dir)})
    assert post(proc.url, {"name": "declared_token"}) == (200, {"length": 17})
    status, body = post(proc.url, {"name": "undeclared_token"})
    assert status == 500 and body["error"].startswith("SecretNotFound")
    assert "undeclared_token" in body["error"] and "other-value" not in json.dumps(body)
    assert "other-value" not in proc.output and "s3cr3t" not in proc.output
    # In-process: not a KeyError, so secrets.get() does not quietly answer None.
    rt = ModelRuntime(corpus / "secrets", device="cpu")
    rt.load()
    with pytest.raises(SecretNotFound) as e:
        rt.model._secrets.get("undeclared_token")
    assert e.value.name == "undeclared_token"


def test_pre_and_post_run_outside_the_predict_limit(serve: Callable[..., ServiceProcess],
                                                    tmp_path: Path) -> None:
    proc = serve("concurrency")  # runtime.predict_concurrency: 1
    gates = {step: tmp_path / f"a-{step}" for step in ("predict", "post")}
    for fifo in gates.values():
        os.mkfifo(fifo)
    results: dict[str, tuple[int, Any]] = {}

    def send(name: str, body: dict[str, Any]) -> None:
        results[name] = post(proc.url, {"name": name, **body})

    a = threading.Thread(target=send, args=("a", {"gates": {k: str(v) for k, v in
                                                          gates.items()}}))
    a.start()
    b: threading.Thread | None = None
    try:
        proc.wait_line("TRUSS_EVENT predict a")  # a holds the only predict slot
        b = threading.Thread(target=send, args=("b", {}))
        b.start()
        # b's preprocess runs to its end while a is still inside predict.
        proc.wait_line("TRUSS_EVENT pre-done b")
        assert "TRUSS_EVENT predict-done a" not in proc.output
        release(gates["predict"])
        # b's predict runs while a's postprocess is still blocked.
        proc.wait_line("TRUSS_EVENT predict-done b")
        assert "TRUSS_EVENT post-done a" not in proc.output
        release(gates["post"])
    finally:
        a.join(120)
        if b is not None:
            b.join(120)
    assert results == {"a": (200, {"done": "a"}), "b": (200, {"done": "b"})}
    events = re.findall(r"TRUSS_EVENT (\S+ \S+)", proc.output)
    # The limit holds: b entered predict only after a's predict had returned.
    assert events.index("predict-done a") < events.index("predict b"), events


# -- streaming -----------------------------------------------------------------------------


def test_a_sync_generator_streams(serve: Callable[..., ServiceProcess],
                                  tmp_path: Path) -> None:
    proc = serve("streaming_sync")
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    conn, resp = open_stream(proc.url, "/predict", {"gate": str(gate)})
    try:
        assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.readline() == b"first\n"  # while the model waits at the gate
        release(gate)
        assert resp.read() == b"second\nbytes too\n"
    finally:
        conn.close()


def test_an_async_generator_streams(serve: Callable[..., ServiceProcess],
                                    tmp_path: Path) -> None:
    proc = serve("streaming_async")
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    conn, resp = open_stream(proc.url, "/v1/models/model:predict", {"n": 2, "gate": str(gate)})
    try:
        assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.readline() == b"token-0\n" and resp.readline() == b"token-1\n"
        release(gate)
        assert resp.read() == b"after-gate\n"
    finally:
        conn.close()


def test_generators_stream_through_the_router(corpus: Path, tmp_path: Path) -> None:
    from tests.support.control import API_KEY, ControlServer

    server = ControlServer(tmp_path / "state")
    try:
        for name, body, first, rest in (
                ("streaming_sync", {}, b"first\n", b"second\nbytes too\n"),
                ("streaming_async", {"n": 1}, b"token-0\n", b"after-gate\n")):
            gate = tmp_path / f"{name}.gate"
            os.mkfifo(gate)
            model_id = server.ok("POST", "/v1/models", {"name": name})["id"]
            dep = server.ok("POST", f"/v1/models/{model_id}/deployments",
                            {"model_dir": str(corpus / name)})
            conn, resp = open_stream(
                server.url, f"/models/{model_id}/deployment/{dep['id']}/predict",
                {**body, "gate": str(gate)}, headers={"Authorization": f"Api-Key {API_KEY}"})
            try:
                assert resp.status == 200, resp.read()
                # The first item came through the router while the model still waits.
                assert resp.readline() == first
                release(gate)
                assert resp.read() == rest
            finally:
                conn.close()
    finally:
        server.stop()


def _tmp_model(root: Path, model_py: str) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.py").write_text(model_py)
    (root / "config.yaml").write_text("model_name: edge\n")
    return root


def test_a_stream_that_fails_midway_is_cut_short(tmp_path: Path) -> None:
    model = _tmp_model(tmp_path / "m", (
        "class Model:\n"
        "    def predict(self, model_input):\n"
        "        yield 'ok\\n'\n"
        "        raise RuntimeError('broken generator')\n"))
    with ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0")) as proc:
        proc.wait_line(READY)
        conn, resp = open_stream(proc.url, "/predict", {})
        try:
            assert resp.status == 200
            # No final chunk: the client learns the stream is incomplete, never a
            # response that looks whole.
            with pytest.raises(http.client.IncompleteRead) as e:
                resp.read()
            assert e.value.partial == b"ok\n"
        finally:
            conn.close()
        proc.wait_line("broken generator")  # logged with the model's traceback
        with urllib.request.urlopen(proc.url + "/health/ready", timeout=60) as ready:
            assert ready.status == 200, "the server goes on serving"


def test_a_stream_cannot_go_through_postprocess(tmp_path: Path) -> None:
    model = _tmp_model(tmp_path / "m", (
        "class Model:\n"
        "    def predict(self, model_input):\n"
        "        yield 'x'\n"
        "    def postprocess(self, model_output):\n"
        "        return model_output\n"))
    with ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0")) as proc:
        proc.wait_line(READY)
        status, body = post(proc.url, {})
        assert status == 500 and "postprocess cannot take a stream" in body["error"]


def test_top_level_predict_concurrency_still_works_with_a_warning(tmp_path: Path) -> None:
    model = _tmp_model(tmp_path / "m", "class Model:\n    def predict(self, x):\n"
                                       "        return x\n")
    (model / "config.yaml").write_text("predict_concurrency: 3\n")
    with ServiceProcess(bdn_command("serve", str(model), "--listen", "127.0.0.1:0")) as proc:
        proc.wait_line(READY)
        assert "top-level predict_concurrency is deprecated" in proc.output
        with urllib.request.urlopen(proc.url + "/metrics", timeout=60) as resp:
            assert "bdn_predict_concurrency 3" in resp.read().decode()


# -- folder layout and requirements --------------------------------------------------------


def test_truss_layout_keys_data_dir_and_environment_variables(
        serve: Callable[..., ServiceProcess]) -> None:
    proc = serve("layout")
    assert post(proc.url, {}) == (200, {"value": "42", "flag": "true", "number": "7"})
    # requirements are recorded and the missing one reported, never installed.
    assert "bdn-test-package-that-is-not-installed==1.0" in proc.output
    assert "does not install" in proc.output and "numpy," not in proc.output


def test_a_missing_requirement_is_named_when_the_import_fails(
        serve: Callable[..., ServiceProcess], corpus: Path, in_process: None) -> None:
    proc = serve("missing_requirement", ready=False)
    assert proc.proc.wait(120) == 1
    assert "bdn_test_package_that_is_not_installed==1.0" in proc.output
    assert "not installed on this node" in proc.output and READY not in proc.output
    with pytest.raises(ModelLoadError, match="bdn does not install requirements"):
        ModelRuntime(corpus / "missing_requirement", device="cpu").load()


def test_corpus_configs_copy_is_untouched() -> None:
    """The tests above run on a copy: the corpus itself stays as committed."""
    assert not any(CORPUS.rglob("__pycache__")), "a test imported the corpus in place"
