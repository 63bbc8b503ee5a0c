"""The documented chain examples run locally (``run_local``, mocks) and are validated
at import time; the generated model folders carry each chainlet's compute and graph."""

from __future__ import annotations

import asyncio
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import bdn_chains
from bdn_chains.codegen import generate, load_chain

EXAMPLES = Path(__file__).with_name("examples")


def load(tmp_path: Path, name: str):
    """Import an example chain from a copy (each test its own module)."""
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    shutil.copy(EXAMPLES / f"{name}.py", folder / f"{name}.py")
    chain = load_chain(folder / f"{name}.py")
    return chain, sys.modules[chain.module]


def test_hello_run_local(tmp_path: Path) -> None:
    _, mod = load(tmp_path, "hello")
    with bdn_chains.run_local():
        hello = mod.HelloWorld()
        result = asyncio.run(hello.run_remote(max_value=5))
    n = result.count("Hello World! ")
    assert 1 <= n <= 5 and result == "Hello World! " * n


def test_poems_run_local_with_mock(tmp_path: Path) -> None:
    _, mod = load(tmp_path, "poems")

    class FakePhiLLM:
        async def run_remote(self, prompt) -> str:
            return f"Here's a poem about {prompt.messages[-1]['content'].split(' ')[-1]}"

    with bdn_chains.run_local():
        poem_generator = mod.PoemGenerator(phi_llm=FakePhiLLM())
        result = asyncio.run(poem_generator.run_remote(words=["bird", "plane", "superman"]))
    assert result == ["Here's a poem about bird", "Here's a poem about plane",
                      "Here's a poem about superman"]


def test_error_run_local_raises_the_root_cause(tmp_path: Path) -> None:
    _, mod = load(tmp_path, "itest_chain")
    with bdn_chains.run_local():
        chain = mod.ItestChain()
        assert asyncio.run(chain.run_remote(length=5)) == 10
        with pytest.raises(ValueError, match="This input is too long: 100"):
            asyncio.run(chain.run_remote(length=100))


def test_naive_instantiation_is_refused(tmp_path: Path) -> None:
    _, mod = load(tmp_path, "hello")
    with pytest.raises(bdn_chains.ChainsError, match="cannot be instantiated directly"):
        mod.HelloWorld()


@pytest.mark.parametrize("body, message", [
    ("async def run_remote(self, x) -> int:\n    return 1", "argument 'x' has no type"),
    ("async def run_remote(self, x: int):\n    return 1", "no return annotation"),
    ("async def run_remote(self, x: object) -> int:\n    return 1", "only primitive types"),
])
def test_run_remote_signature_is_validated_at_import(body: str, message: str) -> None:
    src = "class Bad(bdn_chains.ChainletBase):\n" + textwrap.indent(body, "    ")
    with pytest.raises(bdn_chains.ChainsError, match=message):
        exec(src, {"bdn_chains": bdn_chains})


def test_one_entrypoint_required(tmp_path: Path) -> None:
    (tmp_path / "none.py").write_text(textwrap.dedent("""\
        import truss_chains as chains

        class A(chains.ChainletBase):
            async def run_remote(self) -> int:
                return 1
        """))
    with pytest.raises(bdn_chains.ChainsError, match="exactly one chainlet"):
        load_chain(tmp_path / "none.py")


def test_generated_folders_carry_compute_and_graph(tmp_path: Path) -> None:
    chain, _ = load(tmp_path, "poems")
    folders = generate(chain, tmp_path / "out")
    assert sorted(folders) == ["PhiLLM", "PoemGenerator"]
    llm = yaml.safe_load((folders["PhiLLM"] / "config.yaml").read_text())
    assert llm["resources"] == {"cpu": "1", "memory": "1Gi"}
    assert llm["model_metadata"]["bdn_chains"]["docker_image"]["pip_requirements"] == [
        "transformers==4.41.2"]
    entry = yaml.safe_load((folders["PoemGenerator"] / "config.yaml").read_text())
    meta = entry["model_metadata"]["bdn_chains"]
    assert meta["entrypoint"] is True and meta["dependencies"] == ["PhiLLM"]
    assert (folders["PoemGenerator"] / "chain" / "poems.py").is_file()
    assert "async def predict" in (folders["PoemGenerator"] / "model" / "model.py").read_text()


def test_numpy_field_round_trips_json_and_binary() -> None:
    import msgpack
    import numpy as np
    import pydantic

    from bdn_chains.pydantic_numpy import NumpyArrayField

    class DataModel(pydantic.BaseModel):
        some_numbers: NumpyArrayField
        other_field: str

    data = DataModel(some_numbers=np.arange(6, dtype=np.float64).reshape(3, 2),
                     other_field="Example")
    assert "data_b64" in data.model_dump_json()
    again = DataModel.model_validate_json(data.model_dump_json())
    assert np.array_equal(again.some_numbers.array, data.some_numbers.array)
    packed = msgpack.packb(data.model_dump(mode="python"), use_bin_type=True)
    back = DataModel.model_validate(msgpack.unpackb(packed, raw=False))
    assert back.some_numbers.array.shape == (3, 2)
    assert np.array_equal(back.some_numbers.array, data.some_numbers.array)


def test_loading_a_chain_leaves_truss_chains_as_it_was(tmp_path: Path) -> None:
    before = sys.modules.get("truss_chains")
    load(tmp_path, "hello")
    assert sys.modules.get("truss_chains") is before


def test_same_example_under_the_real_truss_chains(tmp_path: Path) -> None:
    """The documented surface matches: the hello chain, run with truss's own run_local."""
    truss_chains = pytest.importorskip("truss_chains")
    if truss_chains is bdn_chains:
        pytest.skip("truss_chains is bound to bdn_chains in this process")
    import importlib.util
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(EXAMPLES / "hello.py", folder / "hello_real.py")
    spec = importlib.util.spec_from_file_location("hello_real", folder / "hello_real.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hello_real"] = mod
    spec.loader.exec_module(mod)
    with truss_chains.run_local():
        result = asyncio.run(mod.HelloWorld().run_remote(max_value=1))
    assert result == "Hello World! "
