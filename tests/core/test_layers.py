"""The package layering of DESIGN.md ("Packages and what each may import"), enforced.

Imports are read from the source with :mod:`ast` (tests/support/imports.py: every
``import``/``from`` anywhere in a module, lazy ones inside functions included), so a
violation is caught without importing anything. The table is repeated here from
DESIGN.md at the granularity of top-level packages, except serving's "agent events",
which is one module (``agent.events``); a change to the design changes both.

Beside the table, two rules keep the mirror side free of circles: the blob store imports
no source and no transfer code, and the transfer engine (``bdn/transfer/``) imports no
source adapter and not the mirror — adapters import the engine, never the reverse.

A second group checks what a role pays at import time: a cache pod or an agent must
install and start without torch or the cloud SDKs (``bdn[serving]``, ``bdn[s3]``, ...).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.imports import imported_modules, module_name

ROOT = Path(__file__).resolve().parents[2]

# DESIGN.md: package → the packages of ours it may import.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "manifests": frozenset(),
    "bdn": frozenset({"manifests"}),
    "cache": frozenset({"manifests", "bdn"}),
    "agent": frozenset({"manifests", "bdn", "cache"}),
    # Of the agent, only its event records (``agent.events``): see MAY_IMPORT_MODULES.
    "serving": frozenset({"manifests", "bdn"}),
    "control": frozenset({"bdn", "agent", "bdn_chains"}),
    # The documented Chains API (``truss_chains``-compatible) that users import.
    "bdn_chains": frozenset({"bdn"}),
}

# Package → single modules of a package its row does not allow, which it may import by
# that exact name (``from agent.events import ...``; ``from agent import events`` reads
# as importing ``agent`` and is refused).
MAY_IMPORT_MODULES: dict[str, frozenset[str]] = {
    "serving": frozenset({"agent.events"}),
}

# (importing module, imported package) → why it is tolerated for now. Each entry is to be
# removed by the change that fixes it; one whose module still exists but no longer
# violates the table fails the test, so the list only shrinks.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}

# ``demo/`` (``make demo``) sits above everything and may import any package; none may
# import it.
TOP_ONLY = frozenset({"demo"})

# Loading any of these is a cost the cache pod and the agent must not pay.
HEAVY_MODULES = ("torch", "s3fs", "gcsfs", "huggingface_hub", "boto3", "botocore",
                 "aiobotocore", "google_crc32c", "crc32c", "safetensors")


def modules_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_layers_packages_import_only_what_design_allows() -> None:
    found: dict[tuple[str, str], list[str]] = {}
    for package, allowed in MAY_IMPORT.items():
        files = modules_of(package)
        assert files, f"package {package}/ has no modules"
        for path in files:
            importer = module_name(path)
            for name in imported_modules(path):
                top = name.split(".")[0]
                if ((top in MAY_IMPORT or top in TOP_ONLY) and top != package
                        and top not in allowed
                        and name not in MAY_IMPORT_MODULES.get(package, ())):
                    found.setdefault((importer, top), []).append(name)
    violations = {k: v for k, v in found.items() if k not in KNOWN_EXCEPTIONS}
    assert not violations, (
        "imports that DESIGN.md's table does not allow: "
        + "; ".join(f"{m} imports {', '.join(sorted(set(v)))}"
                    for (m, _), v in sorted(violations.items())))
    for importer, top in KNOWN_EXCEPTIONS:
        path = ROOT / Path(*importer.split("."))
        if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
            assert (importer, top) in found, (
                f"{importer} no longer imports {top}: remove its entry from "
                "KNOWN_EXCEPTIONS")


def test_layers_serving_reads_agent_events_and_they_stay_narrow() -> None:
    # The allowance is used (so it is not left behind vacuous), and what it lets in
    # loads no more of the agent than its errors: the event records are the contract
    # between the agent and the serving runtime, not a way into the engine.
    names = {n for p in modules_of("serving") for n in imported_modules(p)}
    assert "agent.events" in names
    ours = {n for n in imported_modules(ROOT / "agent" / "events.py")
            if n.split(".")[0] in MAY_IMPORT}
    assert ours == {"agent.errors"}, ours


def test_layers_store_imports_no_source_and_no_transfer() -> None:
    names = list(imported_modules(ROOT / "bdn" / "store.py"))
    bad = [n for n in names if n.startswith(("bdn.sources", "bdn.transfer", "bdn.mirror"))]
    assert not bad, f"bdn/store.py imports {bad}"


def test_layers_transfer_engine_imports_no_source_adapter() -> None:
    bad = []
    for path in sorted((ROOT / "bdn" / "transfer").rglob("*.py")):
        for name in imported_modules(path):
            if name == "bdn.sources" or name.startswith(("bdn.sources.", "bdn.mirror")):
                bad.append(f"{module_name(path)} imports {name}")
    assert not bad, "the transfer engine must not import sources or the mirror: " + \
        "; ".join(bad)


def test_layers_sources_use_the_engine() -> None:
    # The other half of the direction: the adapters reach the engine (this also keeps
    # the rule above from passing vacuously after a rename).
    names = {n for p in (ROOT / "bdn" / "sources").rglob("*.py") for n in imported_modules(p)}
    assert any(n.startswith("bdn.transfer.") for n in names)


def test_layers_import_reader_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("from . import mod\n")
    mod = tmp_path / "pkg" / "sub" / "mod.py"
    mod.write_text("import os.path\nfrom ..other import x\nfrom . import y\n"
                   "def f():\n    from agent.client import AgentClient\n")
    assert sorted(imported_modules(mod, tmp_path)) == [
        "agent.client", "os.path", "pkg.other", "pkg.sub"]
    assert list(imported_modules(tmp_path / "pkg" / "sub" / "__init__.py", tmp_path)) == [
        "pkg.sub"]


@pytest.mark.parametrize("modules", [
    ["cache.server", "cache.cli"],
    ["agent.daemon", "agent.cli"],
    ["bdn.cli"],  # `bdn cache-server` / `bdn agent`: the parser loads every command module
])
def test_layers_cache_and_agent_import_without_torch_or_cloud_sdks(
        modules: list[str]) -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    mod = importlib.import_module(m)\n"
        "    if m == 'bdn.cli':\n"
        "        mod.build_parser()\n"
        f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {modules} loaded {loaded}"


@pytest.mark.parametrize(("uri", "sdk", "extra"), [
    ("hf://org/model", "huggingface_hub", "hf"),
    ("s3://bucket/prefix", "s3fs", "s3"),
    ("gs://bucket/prefix", "gcsfs", "gcs"),
])
def test_layers_source_without_its_extra_names_the_extra(uri: str, sdk: str,
                                                         extra: str) -> None:
    # A None entry in sys.modules makes the import fail as if the SDK were not installed.
    code = (
        "import sys\n"
        f"sys.modules[{sdk!r}] = None\n"
        "from bdn.errors import ConfigError\n"
        "from bdn.sources import open_source\n"
        "try:\n"
        f"    open_source({uri!r})\n"
        "except ConfigError as e:\n"
        "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"{sdk} missing" in out.stdout and f"pip install 'bdn[{extra}]'" in out.stdout

