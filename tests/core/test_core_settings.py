"""``bdn.settings``: the one table of ``BDN_*`` variables and the one place that reads
them; every variable documented; values read at call time; bad ones named.

The grep below reads the source with :mod:`ast` (as tests/core/test_layers.py does for
imports), so a read hidden behind a constant (``os.environ.get(API_KEY_ENV)``) or a
mapping parameter (``env.get(URL_ENV)``) is found as well as a literal one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bdn import settings
from bdn.errors import BdnError, ConfigError, SettingError
from bdn.secrets import SecretResolver, env_name
from bdn.settings import SETTINGS, Setting
from bdn.units import parse_byte_size

ROOT = Path(__file__).resolve().parents[2]
# Every package of ours that runs in a bdn process (bench/, demo/ and tests/ set and read
# variables for the processes they start; they are not the product).
PACKAGES = ("manifests", "bdn", "cache", "agent", "serving", "control", "bdn_chains")
ALLOWED = {ROOT / "bdn" / "settings.py"}


def _bdn_names(tree: ast.AST) -> dict[str, str]:
    """Names bound anywhere in the module to a ``"BDN_..."`` string."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str) and node.value.value.startswith("BDN_")):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _is_bdn(expr: ast.AST, names: dict[str, str]) -> bool:
    """Whether ``expr`` names a ``BDN_*`` variable: a literal, a constant bound to one,
    an f-string or ``+`` that starts with one (the ``BDN_SECRET_`` family)."""
    if isinstance(expr, ast.Constant):
        return isinstance(expr.value, str) and expr.value.startswith("BDN_")
    if isinstance(expr, ast.Name):
        return expr.id in names
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
        return _is_bdn(expr.left, names)
    if isinstance(expr, ast.JoinedStr) and expr.values:
        return _is_bdn(expr.values[0], names)
    return False


def _is_environ(expr: ast.AST) -> bool:
    return ((isinstance(expr, ast.Attribute) and expr.attr == "environ")
            or (isinstance(expr, ast.Name) and expr.id == "environ"))


def env_reads(path: Path) -> Iterator[str]:
    """``file:line`` of every read of a ``BDN_*`` variable in ``path``: ``getenv(X)``,
    ``<anything>.get(X)`` (``os.environ`` or a mapping standing for it), ``environ[X]``
    and ``X in environ``, where X names a ``BDN_*`` variable."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = _bdn_names(tree)
    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.Call) and node.args and _is_bdn(node.args[0], names):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else \
                func.id if isinstance(func, ast.Name) else ""
            hit = fname in ("get", "getenv", "__getitem__")
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
              and _is_environ(node.value)):
            hit = _is_bdn(node.slice, names)
        elif (isinstance(node, ast.Compare) and len(node.ops) == 1
              and isinstance(node.ops[0], ast.In) and _is_environ(node.comparators[0])):
            hit = _is_bdn(node.left, names)
        if hit:
            yield f"{path.relative_to(path.parents[1])}:{getattr(node, 'lineno', 0)}"


def test_settings_no_module_but_bdn_settings_reads_a_bdn_variable() -> None:
    found = [hit for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
             if path not in ALLOWED for hit in env_reads(path)]
    assert found == [], ("read BDN_* variables through bdn.settings (one Setting each), "
                         "not directly: " + ", ".join(found))


def test_settings_reader_grep_sees_every_form(tmp_path: Path) -> None:
    # Each line reads a BDN_ variable directly; the grep must find all of them, and
    # none of the writes or non-BDN reads at the end.
    mod = tmp_path / "pkg" / "mod.py"
    mod.parent.mkdir()
    mod.write_text(
        "import os\nfrom os import environ, getenv\n"
        "KEY_ENV = 'BDN_SOME_KEY'\n"
        "a = os.environ.get('BDN_A')\n"                    # 4
        "b = os.getenv('BDN_B', '')\n"                     # 5
        "c = os.environ['BDN_C']\n"                        # 6
        "d = environ.get(KEY_ENV)\n"                       # 7
        "def f(env):\n    return env.get(KEY_ENV)\n"       # 9
        "e = os.environ.get('BDN_SECRET_' + 'X')\n"        # 10
        "g = 'BDN_G' in os.environ\n"                      # 11
        "h = getenv(f'BDN_H_{a}')\n"                       # 12
        "os.environ['BDN_SET'] = '1'\n"
        "i = os.environ.get('HOME')\n"
        "j = {'name': 'BDN_POD_IP'}\n")
    lines = [int(hit.rsplit(":", 1)[1]) for hit in env_reads(mod)]
    assert sorted(lines) == [4, 5, 6, 7, 9, 10, 11, 12]


def test_settings_every_setting_is_documented_once() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names)), "a variable is listed twice"
    for s in SETTINGS:
        assert s.name.startswith("BDN_") and len(s.doc.split()) >= 4, s.name
        assert "\n" not in s.doc, f"{s.name}: the doc is one line"
    # Every Setting the module defines is in the table (none forgotten in SETTINGS).
    defined = {v.name for v in vars(settings).values() if isinstance(v, Setting)}
    assert defined == set(names)
    assert settings.SECRET_FAMILY_DOC.startswith("BDN_SECRET_<NAME>")


def test_settings_a_setting_needs_a_doc_and_a_bdn_name() -> None:
    with pytest.raises(ValueError, match="no doc"):
        Setting("BDN_X", None, str, doc=" ")
    with pytest.raises(ValueError, match="must be BDN_"):
        Setting("HOME", None, str, doc="the home folder")
    with pytest.raises(ValueError, match="family"):
        Setting("BDN_SECRET_X", None, str, doc="a secret, but the family is separate")


def test_settings_empty_is_unset_and_defaults_apply() -> None:
    assert settings.AGENT_SOCKET.get({}) is None
    assert settings.AGENT_SOCKET.get({"BDN_AGENT_SOCKET": ""}) is None
    assert settings.AGENT_SOCKET.get({"BDN_AGENT_SOCKET": "/s.sock"}) == "/s.sock"
    assert settings.CHAIN_ID.get({"BDN_CHAIN_ID": "  "}) == ""
    assert settings.STORE.get({}) == str(Path.home() / ".bdn" / "store")
    assert settings.STORE.get({"BDN_STORE": "s3://b/p"}) == "s3://b/p"
    assert settings.ENVIRONMENT.get({"BDN_ENVIRONMENT": "staging"}) == {"name": "staging"}
    assert settings.ENVIRONMENT.get({"BDN_ENVIRONMENT": '{"name": "p", "x": 1}'}) == {
        "name": "p", "x": 1}
    assert settings.ENVIRONMENT.get({"BDN_ENVIRONMENT": "[1]"}) == {"name": "[1]"}


def test_settings_are_read_when_asked_not_at_import(tmp_path: Path) -> None:
    # A fresh process imports bdn.settings first, then sets the variable: the accessor
    # sees the value set after import.
    code = ("import os\nfrom bdn import settings\nfrom bdn.store import default_store_url\n"
            f"os.environ['BDN_STORE'] = {str(tmp_path)!r}\n"
            "print(settings.STORE.get(), default_store_url())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.split() == [str(tmp_path), str(tmp_path)]


def test_settings_bad_value_names_the_variable_and_hides_secrets() -> None:
    size = Setting("BDN_TEST_BUDGET", 0, parse_byte_size, doc="a budget for this test only")
    assert size.get({"BDN_TEST_BUDGET": "1.5G"}) == 3 << 29
    with pytest.raises(SettingError) as info:
        size.get({"BDN_TEST_BUDGET": "lots"})
    err = info.value
    assert isinstance(err, ConfigError) and isinstance(err, BdnError)
    assert err.variable == "BDN_TEST_BUDGET" and str(err).startswith("BDN_TEST_BUDGET: ")
    assert "'lots'" in str(err)
    key = Setting("BDN_TEST_KEY", None, int, doc="a secret number for this test",
                  secret=True)
    with pytest.raises(SettingError) as info:
        key.get({"BDN_TEST_KEY": "hunter2-not-a-number"})
    assert "hunter2" not in str(info.value) and "BDN_TEST_KEY" in str(info.value)


def test_settings_secret_name_is_one_mapping() -> None:
    assert settings.secret_env_name("my-s3.creds") == "BDN_SECRET_MY_S3_CREDS"
    assert settings.secret_env_name("team/hf") == "BDN_SECRET_TEAM_HF"
    assert env_name("team/hf") == settings.secret_env_name("team/hf")
    env = {"BDN_SECRET_TEAM_HF": "hf_value_123", "BDN_SECRET_EMPTY": ""}
    assert settings.secret_from_env("team/hf", env) == "hf_value_123"
    # An empty secret is a value, as it was before the table.
    assert settings.secret_from_env("empty", env) == ""
    assert SecretResolver(None, env).get("empty").reveal() == ""


def test_settings_serving_reads_the_secret_variable_the_control_plane_writes(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # control.push writes BDN_SECRET_<NAME> with bdn.secrets.env_name; serving's
    # Secrets had its own mapping and missed names with other characters than '-'
    # and '.' (a namespaced "team/hf" was looked up as BDN_SECRET_TEAM/HF).
    from serving.runtime import Secrets

    monkeypatch.setenv("BDN_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv(env_name("team/hf_token"), "hf_ns_value_123")
    monkeypatch.setenv(env_name("my-s3.creds"), "creds_value_456")
    secrets = Secrets({"team/hf_token": None, "my-s3.creds": None})
    assert secrets["team/hf_token"] == "hf_ns_value_123"
    assert secrets["my-s3.creds"] == "creds_value_456"
