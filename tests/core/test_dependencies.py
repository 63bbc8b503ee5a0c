"""The dependencies pyproject.toml declares are the ones the code uses, in both directions.

* Every dependency of the core and of each extra is imported somewhere by the source it
  serves (the shipped packages for the core and the run-time extras, tests/ for ``test``,
  bench/ for ``bench``), or is in :data:`RUN_TIME_ONLY` with the reason it is needed
  without an import (a pytest plugin, a command, type stubs, a build backend).
* Every third-party module the shipped packages import is declared (or arrives with a
  declared dependency, :data:`ARRIVES_WITH`), and a core install — no extra — imports
  every role's entry modules: ``pip install bdn`` runs ``bdn control-server``, a cache
  pod and an agent.

Imports are read from the source with :mod:`ast` (tests/support/imports.py), lazy ones
inside functions included. A dependency's import name is its normalised name unless
:data:`IMPORT_NAMES` says otherwise; the installed distributions' metadata checks that
table, so a wrong entry cannot make the first check vacuous.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.imports import imported_modules

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]["name"]

# Import names that are not the distribution's name with "-" → "_".
IMPORT_NAMES: dict[str, str] = {
    "pyyaml": "yaml",
    "pytest-xdist": "xdist",
}

# Declared, needed, never imported by name; each says why. An entry that is imported
# after all, or no longer declared, fails test_run_time_only_entries_are_still_needed.
RUN_TIME_ONLY: dict[str, str] = {
    "pytest-asyncio": "pytest plugin: runs the async tests (asyncio_mode = auto)",
    "pytest-timeout": "pytest plugin: the timeout = 300 of [tool.pytest.ini_options]",
    "pytest-xdist": "pytest plugin: `make test-fast` runs on every core (-n auto)",
    "moto": "run as a server process, `python -m moto.server` (tests/mirror/conftest.py)",
    "ruff": "a command: `make lint`",
    "mypy": "a command: `make typecheck`",
    "types-pyyaml": "type stubs that mypy reads",
    "setuptools": "the build backend of the wheel test, built without build isolation "
                  "(tests/core/test_wheel.py; no index to fetch it from)",
}

# Third-party modules the packages import that are installed by a declared dependency:
# module → the dependency that brings it.
ARRIVES_WITH: dict[str, str] = {
    "yarl": "aiohttp",  # aiohttp's own URL type, which cache/worker.py builds
    "pydantic_core": "pydantic",
}

# Imported where present, with a fallback where not; declared nowhere on purpose.
OPTIONAL_IMPORTS: dict[str, str] = {
    "tokenizers": "demo/minilm/model/model.py: its own WordPiece when tokenizers is absent",
}

# The extras whose code lives outside the shipped packages.
EXTRA_SOURCES: dict[str, str] = {"test": "tests", "bench": "bench"}

# What each role imports when it starts: `bdn --help` builds every command's parser;
# `bdn control-server` (embedded agent, local backend), `bdn cache-server`, `bdn agent`,
# `bdn mirror-server` and `bdn push` import these.
ROLE_MODULES = ("bdn.cli", "control.api", "control.backends", "control.controller",
                "control.push", "cache.server", "agent.daemon", "bdn.mirror_service")


def dist_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, f"unreadable requirement {requirement!r} in pyproject.toml"
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def import_name(dist: str) -> str:
    return IMPORT_NAMES.get(dist, dist.replace("-", "_"))


def declared() -> dict[str, list[str]]:
    """Group ("core" or an extra) → its distributions, the project's own extras left out."""
    groups = {"core": PYPROJECT["project"]["dependencies"],
              **PYPROJECT["project"]["optional-dependencies"]}
    return {g: [d for d in map(dist_name, reqs) if d != PROJECT] for g, reqs in groups.items()}


def shipped_packages() -> list[str]:
    """The top-level packages the wheel ships ([tool.setuptools.packages.find] include)."""
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(p.name for p in ROOT.iterdir()
                  if (p / "__init__.py").is_file()
                  and any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns))


def top_level_imports(folders: list[str]) -> set[str]:
    return {name.split(".")[0] for folder in folders
            for path in (ROOT / folder).rglob("*.py")
            for name in imported_modules(path)}


def third_party(names: set[str]) -> set[str]:
    ours = set(shipped_packages()) | {"tests", "bench"}
    return {n for n in names if n not in ours and n not in sys.stdlib_module_names}


def test_every_declared_dependency_is_imported_or_needed_at_run_time() -> None:
    package_imports = top_level_imports(shipped_packages())
    unused = []
    for group, dists in declared().items():
        source = EXTRA_SOURCES.get(group)
        imports = top_level_imports([source]) if source else package_imports
        unused += [f"{d} ({group}: {source or 'the packages'} never import "
                   f"{import_name(d)})" for d in dists
                   if import_name(d) not in imports and d not in RUN_TIME_ONLY]
    assert unused == [], f"declared but unused: {'; '.join(unused)}"


def test_run_time_only_entries_are_still_needed() -> None:
    everywhere = top_level_imports([*shipped_packages(), *EXTRA_SOURCES.values()])
    all_declared = {d for dists in declared().values() for d in dists}
    stale = [d for d in RUN_TIME_ONLY
             if d not in all_declared or import_name(d) in everywhere]
    assert stale == [], f"RUN_TIME_ONLY entries no longer needed: {stale}"


def test_import_names_match_the_installed_distributions() -> None:
    provided = importlib.metadata.packages_distributions()
    by_dist: dict[str, set[str]] = {}
    for module, dists in provided.items():
        for d in dists:
            by_dist.setdefault(dist_name(d), set()).add(module)
    wrong = []
    for dists in declared().values():
        for d in dists:
            if d in by_dist and d != "types-pyyaml" and import_name(d) not in by_dist[d]:
                wrong.append(f"{d} provides {sorted(by_dist[d])}, not {import_name(d)}")
    assert wrong == [], f"IMPORT_NAMES is wrong: {wrong}"


def provided_by(dists: set[str]) -> set[str]:
    """The import names that installing ``dists`` makes available, as far as we know."""
    return ({import_name(d) for d in dists}
            | {m for m, d in ARRIVES_WITH.items() if d in dists})


def test_every_third_party_import_of_the_packages_is_declared() -> None:
    runtime = {d for g, dists in declared().items() if g not in EXTRA_SOURCES for d in dists}
    missing = sorted(third_party(top_level_imports(shipped_packages()))
                     - provided_by(runtime) - set(OPTIONAL_IMPORTS))
    assert missing == [], f"imported by the packages but declared nowhere: {missing}"


@pytest.mark.slow  # a fresh interpreter per role
def test_a_core_install_imports_every_role() -> None:
    """Without any extra, the roles' entry modules import: every third-party module the
    packages import that the core does not declare is made unimportable, as if absent."""
    absent = sorted(third_party(top_level_imports(shipped_packages()))
                    - provided_by(set(declared()["core"])))
    # A None entry in sys.modules makes the import fail as if the module were not installed.
    code = (
        "import importlib, json, sys\n"
        f"for name in {absent!r}:\n"
        "    sys.modules[name] = None\n"
        "failed = {}\n"
        f"for m in {ROLE_MODULES!r}:\n"
        "    try:\n"
        "        mod = importlib.import_module(m)\n"
        "        if m == 'bdn.cli':\n"
        "            mod.build_parser()\n"
        "    except ImportError as e:\n"
        "        failed[m] = str(e)\n"
        "print(json.dumps(failed))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert failed == {}, f"a core install (without {absent}) cannot import: {failed}"
