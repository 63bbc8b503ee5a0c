"""Rules for the test suite itself: no test module imports from a ``conftest`` (pytest
loads those itself; importing one twice under two names runs its module code twice and
splits its globals), so shared helpers live in tests/support/."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_test_imports_from_a_conftest() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.relative_to(TESTS)}:{node.lineno} imports {name}"
                          for name in names if "conftest" in name.split(".")]
    assert offenders == []
