"""bdn's implementation of the documented Chains API (``import truss_chains as chains``).

Why bdn's own and not the ``truss`` package's ``truss_chains``: bdn must supply the
transport between chainlets (calls routed, queued and cold-started by bdn's control
plane) and discover the graph, and truss exposes neither publicly — its registry and
importer live in ``truss_chains.framework``, its stubs read Baseten's dynamic config
files and speak its own server's protocol — while truss itself is far too heavy a
runtime dependency for a replica. So:

* In processes bdn runs (``bdn chains push``, chainlet replicas) ``truss_chains`` is
  always bound to this package (:func:`bind_truss_chains`), so a chain behaves the same
  on bdn whether or not truss is installed.
* In a user's own process, ``import truss_chains`` gets the real package when it is
  installed (its ``run_local`` follows the same documentation); without it,
  ``import bdn_chains as chains``, or :func:`install_as_truss_chains` first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator

from bdn_chains import pydantic_numpy
from bdn_chains.framework import (
    Assets,
    ChainletBase,
    ChainletOptions,
    ChainsError,
    Compute,
    DeployedServiceDescriptor,
    DeploymentContext,
    DockerImage,
    GenericRemoteException,
    RemoteConfig,
    RemoteErrorDetail,
    RPCOptions,
    depends,
    depends_context,
    mark_entrypoint,
    run_local,
)

__all__ = [
    "Assets", "ChainletBase", "ChainletOptions", "ChainsError", "Compute",
    "DeployedServiceDescriptor", "DeploymentContext", "DockerImage",
    "GenericRemoteException", "RPCOptions", "RemoteConfig", "RemoteErrorDetail",
    "bind_truss_chains", "depends", "depends_context", "install_as_truss_chains",
    "mark_entrypoint", "pydantic_numpy", "run_local", "truss_chains_bound",
]

ALIAS = "truss_chains"


def bind_truss_chains() -> None:
    """Make ``import truss_chains`` give this package in this process (bdn's own
    processes only: the transport is bdn's)."""
    sys.modules[ALIAS] = sys.modules[__name__]
    sys.modules[ALIAS + ".pydantic_numpy"] = pydantic_numpy


@contextlib.contextmanager
def truss_chains_bound() -> Iterator[None]:
    """``truss_chains`` is this package while the block runs, and what it was after (so
    loading a chain in a process that also uses the real truss leaves it untouched)."""
    names = (ALIAS, ALIAS + ".pydantic_numpy")
    before = {n: sys.modules.get(n) for n in names}
    bind_truss_chains()
    try:
        yield
    finally:
        for n, m in before.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def install_as_truss_chains() -> bool:
    """Alias ``truss_chains`` to this package unless the real one is installed; returns
    whether the alias was made."""
    if ALIAS in sys.modules:
        return sys.modules[ALIAS] is sys.modules[__name__]
    if importlib.util.find_spec(ALIAS) is not None:
        return False
    bind_truss_chains()
    return True
