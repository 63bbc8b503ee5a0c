"""Fixtures for control-plane tests (used by tests/control, tests/chains): model folders,
and a real control server on loopback. The conftest files of those folders re-export
them, so no test imports a conftest.

Replicas are real processes. The ``server`` fixture runs real ``bdn serve`` replicas (the
serving package's; ``BDN_TEST_REPLICA=standin`` or its absence falls back to the
stand-in); ``quick_server`` runs ``replica_standin.py``, which speaks the same replica
contract and starts in a fraction of the time. Model folders block in ``load()`` or
``predict()`` until a gate file exists, so a test can hold a replica in its cold start
(or a request in flight) for exactly as long as it needs, without sleeping.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.control import MODEL_TEMPLATE, ControlServer, ModelFolder


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., ModelFolder]:
    counter = iter(range(1000))

    def make(name: str = "echo", *, version: int = 1, gated_load: bool = False,
             gated_predict: bool = False, fail_load: bool = False,
             predict_concurrency: int = 64) -> ModelFolder:
        n = next(counter)
        root = tmp_path / f"{name}-{n}"
        (root / "model").mkdir(parents=True)
        load_gate = tmp_path / f"{name}-{n}.load-gate"
        predict_gate = tmp_path / f"{name}-{n}.predict-gate"
        stream_gate = tmp_path / f"{name}-{n}.stream-gate"
        (root / "config.yaml").write_text(textwrap.dedent(f"""\
            model_name: {name}
            weights: []
            resources: {{}}
            predict_concurrency: {predict_concurrency}
            runtime:
              predict_concurrency: {predict_concurrency}
            """))
        (root / "model" / "model.py").write_text(MODEL_TEMPLATE.format(
            load_gate=str(load_gate) if gated_load else "",
            predict_gate=str(predict_gate) if gated_predict else "",
            stream_gate=str(stream_gate), fail_load=fail_load, version=version))
        return ModelFolder(root, load_gate, predict_gate, stream_gate)
    return make


# The two servers below are shared by the tests of a module (each test uses its own model
# names), which saves a server start per test; tests that restart or configure a server
# start their own with ``start_server``.

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlServer]:
    """A control server whose replicas are real ``bdn serve`` processes."""
    srv = ControlServer(tmp_path_factory.mktemp("state"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def quick_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlServer]:
    """A server whose replicas are the stand-in: for tests of the control plane's own
    surfaces (CLI, routing, streaming) where a real replica's start-up (importing torch,
    seconds each) would only slow the suite down."""
    srv = ControlServer(tmp_path_factory.mktemp("quick-state"), replica="standin")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def start_server() -> Iterator[Callable[..., ControlServer]]:
    """Start further servers (own state dir, extra options); all stopped at teardown."""
    started: list[ControlServer] = []

    def start(state_dir: Path, *extra: str, replica: str = "serve",
              env: dict[str, str] | None = None) -> ControlServer:
        srv = ControlServer(state_dir, *extra, replica=replica, env=env)
        started.append(srv)
        return srv
    try:
        yield start
    finally:
        for srv in started:
            srv.stop()
