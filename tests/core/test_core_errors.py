"""One class per error: ``RequestError``, ``NotFoundError`` and ``AuthError`` are defined
once in :mod:`bdn.errors`; ``agent.errors`` and ``control.errors`` add only their root.

What callers rely on is pinned here: each package's ``except`` still catches what it
did (its root, the builtin bases), messages and fields are the same, and the HTTP status
a server maps each one to has not moved.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import agent.errors as agent_errors
import bdn.errors as bdn_errors
import control.errors as control_errors
from cache.errors import CacheNotFoundError
from manifests.errors import BdnError

ROOT = Path(__file__).resolve().parents[2]
SHARED = ("RequestError", "NotFoundError", "AuthError")


def test_errors_shared_classes_are_defined_once() -> None:
    # Only bdn/errors.py gives these names a body of their own: the others add a root
    # (and at most a default), no fields, no message format.
    for path in (ROOT / "agent" / "errors.py", ROOT / "control" / "errors.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name in SHARED:
                base = node.bases[0]
                assert isinstance(base, ast.Attribute) and base.attr == node.name, (
                    f"{path.name}: {node.name} must subclass bdn.errors.{node.name} first")
    for package in (agent_errors, control_errors):
        for name in SHARED:
            cls = getattr(package, name, None)
            if cls is not None:
                assert issubclass(cls, getattr(bdn_errors, name))
                assert cls.__mro__[1] is getattr(bdn_errors, name)


def test_errors_control_classes_keep_their_root_status_and_fields() -> None:
    e = control_errors.RequestError("must be a name", field="name")
    assert str(e) == "name: must be a name" and e.field == "name" and e.status == 400
    assert isinstance(e, control_errors.ControlError) and isinstance(e, ValueError)
    assert isinstance(e, bdn_errors.RequestError) and isinstance(e, BdnError)
    assert isinstance(control_errors.RequestError("no field"), bdn_errors.RequestError)
    assert str(control_errors.RequestError("no field")) == "no field"

    nf = control_errors.NotFoundError("model 'm' does not exist", kind="model", ident="m")
    assert (nf.status, nf.kind, nf.ident) == (404, "model", "m")
    assert str(nf) == "model 'm' does not exist"  # not KeyError's repr
    assert isinstance(nf, control_errors.ControlError) and isinstance(nf, LookupError)
    assert isinstance(nf, bdn_errors.NotFoundError)
    with pytest.raises(control_errors.ControlError):
        raise nf

    auth = control_errors.AuthError("the API key is not valid")
    assert auth.status == 401 and isinstance(auth, control_errors.ControlError)
    assert isinstance(auth, bdn_errors.AuthError)

    # Subclasses of the shared ones keep their own status.
    assert control_errors.ConflictError("x").status == 409
    resources = pytest.importorskip("control.resources")
    assert issubclass(resources.ResourcesError, control_errors.RequestError)


def test_errors_agent_request_error_keeps_its_root() -> None:
    e = agent_errors.RequestError("mount must be absolute")
    assert str(e) == "mount must be absolute" and e.status == 400
    assert isinstance(e, agent_errors.AgentError) and isinstance(e, ValueError)
    assert isinstance(e, bdn_errors.RequestError)
    conflict = agent_errors.IdempotencyConflict("key reused")
    assert isinstance(conflict, agent_errors.RequestError) and conflict.status == 409


def test_errors_store_classes_are_unchanged_for_their_callers() -> None:
    nf = bdn_errors.NotFoundError("object b3:00 is not in the store", url="/s", key="k")
    assert isinstance(nf, bdn_errors.StoreError) and isinstance(nf, KeyError)
    assert (nf.url, nf.key, nf.status) == ("/s", "k", 404)
    assert str(nf) == "object b3:00 is not in the store"
    cache_nf = CacheNotFoundError("no peer holds it", digest="b3:00", url="http://c")
    assert isinstance(cache_nf, bdn_errors.NotFoundError) and cache_nf.key == "b3:00"
    # A store's not-found is not a control-plane error: control's handlers that catch
    # ControlError do not start catching the blob store's.
    assert not isinstance(nf, control_errors.ControlError)
    assert not isinstance(bdn_errors.RequestError("x"), control_errors.ControlError)

    auth = bdn_errors.AuthError("token refused", source="hf://o/m", status=403)
    assert isinstance(auth, bdn_errors.SourceError)
    assert (auth.source, auth.status) == ("hf://o/m", 403)
    assert bdn_errors.AuthError("no token given").status is None
