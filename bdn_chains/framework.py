"""The documented Chains API (``import truss_chains as chains``), bdn's implementation.

A chain is a Python module of *chainlets*: subclasses of :class:`ChainletBase` with one
public ``run_remote`` method, dependencies declared as ``__init__`` defaults made by
:func:`depends` (or :func:`depends_context` for the :class:`DeploymentContext`), and
exactly one class marked with :func:`mark_entrypoint`. Subclassing validates at import
time, as the seed documentation promises (``run_remote`` fully annotated with
primitives or pydantic models, ``__init__`` arguments only ``depends``/``context``), and
records every chainlet in a registry, from which bdn reads the graph it deploys.

Chainlets cannot be constructed naively: only inside :func:`run_local` (every
dependency is then constructed locally, or taken from a keyword argument, which is how
the documentation's mocks work) or by bdn's replica wrapper (``bdn_chains.remote``),
which passes stubs that call the dependency's deployment through the control plane.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import inspect
import pathlib
import threading
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import pydantic

from bdn.errors import BdnError

ENTRYPOINT_ATTR = "_bdn_chains_entrypoint"
DEFAULT_RETRIES = 1
DEFAULT_TIMEOUT_SEC = 600.0
# Types run_remote may take and return besides pydantic models (and containers of them).
PRIMITIVES: tuple[type, ...] = (int, float, str, bool, bytes, type(None))


class ChainsError(BdnError):
    """A chain that the documented contract refuses (names the chainlet and the rule)."""

    def __init__(self, message: str, *, chainlet: str | None = None) -> None:
        super().__init__(f"chainlet {chainlet}: {message}" if chainlet else message)
        self.chainlet = chainlet


class GenericRemoteException(Exception):
    """A dependency raised an exception whose class the caller cannot resolve."""


class StackFrame(pydantic.BaseModel):
    filename: str
    lineno: int | None = None
    name: str
    line: str | None = None


class RemoteErrorDetail(pydantic.BaseModel):
    """The structured error a chainlet returns, and the entrypoint's HTTP error body."""

    exception_cls_name: str
    exception_module_name: str | None = None
    exception_message: str
    user_stack_trace: list[StackFrame] = []
    # The dependency chain the error came through, outermost first.
    chainlet: str | None = None

    def format(self) -> str:
        lines = ["Chainlet-Traceback (most recent call last):"]
        for f in self.user_stack_trace:
            lines.append(f'  File "{f.filename}", line {f.lineno}, in {f.name}')
            if f.line:
                lines.append(f"    {f.line}")
        lines.append(f"{self.exception_cls_name}: {self.exception_message}")
        return "\n".join(lines)


# -- options -------------------------------------------------------------------------

class DockerImage(pydantic.BaseModel):
    """Accepted and recorded; bdn replicas run in the control plane's own image."""

    base_image: Any = None
    pip_requirements: list[str] = []
    pip_requirements_file: Any = None
    apt_requirements: list[str] = []
    data_dir: Any = None
    external_package_dirs: list[Any] | None = None


class Compute(pydantic.BaseModel):
    cpu_count: int = 1
    memory: str = "2Gi"
    accelerator: str | None = None
    predict_concurrency: int | None = None

    def to_resources(self) -> dict[str, Any]:
        """The compute as a ``config.yaml`` ``resources:`` section."""
        out: dict[str, Any] = {"cpu": str(self.cpu_count), "memory": self.memory}
        if self.accelerator:
            out["accelerator"] = self.accelerator
            out["use_gpu"] = True
        return out


class Assets(pydantic.BaseModel):
    secret_keys: list[str] = []
    # bdn: ``weights:`` entries of the chainlet's config (delivered by the node agent).
    weights: list[dict[str, Any]] = []
    cached: list[Any] = []
    external_data: list[Any] = []


class ChainletOptions(pydantic.BaseModel):
    enable_b10_tracing: bool = False
    env_variables: dict[str, str] = {}


class RemoteConfig(pydantic.BaseModel):
    docker_image: DockerImage = DockerImage()
    compute: Compute = Compute()
    assets: Assets = Assets()
    name: str | None = None
    options: ChainletOptions = ChainletOptions()


class RPCOptions(pydantic.BaseModel):
    retries: int = DEFAULT_RETRIES
    timeout_sec: float = DEFAULT_TIMEOUT_SEC
    use_binary: bool = False


class DeployedServiceDescriptor(pydantic.BaseModel):
    name: str
    display_name: str | None = None
    predict_url: str | None = None
    options: RPCOptions = RPCOptions()


class DeploymentContext(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)

    data_dir: pathlib.Path | None = None
    chainlet_to_service: Mapping[str, DeployedServiceDescriptor] = {}
    secrets: Mapping[str, str] = {}
    environment: Any = None

    def get_service_descriptor(self, chainlet_name: str) -> DeployedServiceDescriptor:
        if chainlet_name not in self.chainlet_to_service:
            raise ChainsError(f"no service for chainlet {chainlet_name!r} in the context")
        return self.chainlet_to_service[chainlet_name]


# -- markers -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DependencyMarker:
    """The default value ``depends()`` puts on an ``__init__`` argument."""

    chainlet_cls: type
    options: RPCOptions

    def __getattr__(self, item: str) -> Any:
        raise ChainsError(f"`{self.chainlet_cls.__name__}` was used before it was provided: "
                          "chainlets are constructed by run_local() or by a deployment, "
                          "never directly")


@dataclasses.dataclass(frozen=True)
class ContextMarker:
    def __getattr__(self, item: str) -> Any:
        raise ChainsError("the deployment context was used before it was provided")


def depends(chainlet_cls: type, retries: int = DEFAULT_RETRIES,
            timeout_sec: float = DEFAULT_TIMEOUT_SEC, use_binary: bool = False) -> Any:
    """Declare a dependency on another chainlet (the default of an ``__init__`` arg)."""
    if retries < 1:
        raise ChainsError(f"retries must be at least 1, got {retries}")
    if timeout_sec <= 0:
        raise ChainsError(f"timeout_sec must be positive, got {timeout_sec}")
    return DependencyMarker(chainlet_cls, RPCOptions(retries=retries, timeout_sec=timeout_sec,
                                                     use_binary=use_binary))


def depends_context() -> Any:
    """Declare the ``context`` argument (a :class:`DeploymentContext`)."""
    return ContextMarker()


def mark_entrypoint(cls: type) -> type:
    """Mark the chainlet that answers the chain's public requests."""
    if not (isinstance(cls, type) and issubclass(cls, ChainletBase)):
        raise ChainsError(f"mark_entrypoint takes a ChainletBase subclass, got {cls!r}")
    setattr(cls, ENTRYPOINT_ATTR, True)
    return cls


# -- validation and the registry -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChainletDescriptor:
    cls: type
    name: str
    # __init__ argument name -> dependency.
    dependencies: Mapping[str, DependencyMarker]
    has_context: bool
    is_async: bool
    input_names: tuple[str, ...]
    # A streaming run_remote (an async generator) yields this type: str or bytes.
    stream_item: type | None = None

    @property
    def is_entrypoint(self) -> bool:
        return bool(self.cls.__dict__.get(ENTRYPOINT_ATTR))


def _check_io_type(annotation: Any, where: str, chainlet: str) -> None:
    if annotation is inspect.Parameter.empty:
        raise ChainsError(f"{where} has no type annotation; run_remote must be fully "
                          "annotated with primitive types or pydantic models",
                          chainlet=chainlet)
    origin = typing.get_origin(annotation)
    if origin is not None:
        if origin in (typing.Union, types.UnionType, list, tuple, dict, set,
                      typing.Literal) or str(origin).startswith("collections.abc"):
            if origin is typing.Literal:
                return
            for arg in typing.get_args(annotation):
                if arg is not Ellipsis:
                    _check_io_type(arg, where, chainlet)
            return
        if getattr(origin, "__module__", "") in ("collections.abc", "typing"):
            for arg in typing.get_args(annotation):
                if arg is not Ellipsis:
                    _check_io_type(arg, where, chainlet)
            return
    if annotation in PRIMITIVES or annotation is Any:
        return
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return
    raise ChainsError(f"{where} has type {annotation!r}; only primitive types, pydantic "
                      "models and containers of them cross chainlet boundaries",
                      chainlet=chainlet)


def describe(cls: type) -> ChainletDescriptor:
    """Validate a chainlet class as the documentation describes, or raise ChainsError."""
    name = cls.__name__
    run = cls.__dict__.get("run_remote") or getattr(cls, "run_remote", None)
    if run is None or run is ChainletBase.run_remote:
        raise ChainsError("must define a run_remote method", chainlet=name)
    is_async = inspect.iscoroutinefunction(run) or inspect.isasyncgenfunction(run)
    try:
        hints = typing.get_type_hints(run)
    except Exception as e:
        raise ChainsError(f"run_remote's type annotations do not resolve: {e}",
                          chainlet=name) from e
    sig = inspect.signature(run)
    params = list(sig.parameters.values())
    if not params or params[0].name != "self":
        raise ChainsError("run_remote must be a method taking self", chainlet=name)
    inputs = []
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ChainsError(f"run_remote argument {p.name!r}: *args/**kwargs are not "
                              "allowed", chainlet=name)
        _check_io_type(hints.get(p.name, inspect.Parameter.empty),
                       f"run_remote argument {p.name!r}", name)
        inputs.append(p.name)
    if "return" not in hints:
        raise ChainsError("run_remote has no return annotation", chainlet=name)
    ret = hints["return"]
    stream_item = None
    if inspect.isasyncgenfunction(run):
        # Streams carry text or bytes, as the serving runtime writes them out.
        args = typing.get_args(ret)
        if typing.get_origin(ret) is not collections.abc.AsyncIterator or args not in (
                (str,), (bytes,)):
            raise ChainsError("a streaming run_remote (an async generator) must be "
                              "annotated -> AsyncIterator[str] or AsyncIterator[bytes]",
                              chainlet=name)
        stream_item = args[0]
    else:
        _check_io_type(ret, "run_remote's return value", name)
    deps: dict[str, DependencyMarker] = {}
    has_context = False
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    if init is not object.__init__:
        for p in list(inspect.signature(init).parameters.values())[1:]:
            if isinstance(p.default, DependencyMarker):
                deps[p.name] = p.default
            elif isinstance(p.default, ContextMarker):
                if p.name != "context":
                    raise ChainsError(f"the context argument must be named 'context', not "
                                      f"{p.name!r}", chainlet=name)
                has_context = True
            else:
                raise ChainsError(f"__init__ argument {p.name!r} must default to "
                                  "chains.depends(...) or chains.depends_context()",
                                  chainlet=name)
    return ChainletDescriptor(cls, name, deps, has_context, is_async, tuple(inputs),
                              stream_item)


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_cls: dict[type, ChainletDescriptor] = {}

    def register(self, desc: ChainletDescriptor) -> None:
        with self._lock:
            self.by_cls[desc.cls] = desc

    def descriptors(self, module: types.ModuleType | None = None) -> list[ChainletDescriptor]:
        with self._lock:
            out = list(self.by_cls.values())
        if module is not None:
            # Only the module's own classes: re-importing a file defines new ones.
            out = [d for d in out if vars(module).get(d.name) is d.cls]
        return out

    def get(self, cls: type) -> ChainletDescriptor:
        desc = self.by_cls.get(cls)
        if desc is None:
            raise ChainsError(f"{cls!r} is not a chainlet (a ChainletBase subclass)")
        return desc


REGISTRY = _Registry()

# How chainlets are being constructed on this thread: None (naive: refused), or a
# callable that provides a dependency given its marker.
_local = threading.local()


def _provider() -> Any:
    return getattr(_local, "provider", None)


class ChainletBase:
    """Base of every chainlet; subclassing validates and registers the class."""

    remote_config: RemoteConfig = RemoteConfig()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.__dict__.get("remote_config", RemoteConfig()), RemoteConfig):
            raise ChainsError("remote_config must be a chains.RemoteConfig",
                              chainlet=cls.__name__)
        desc = describe(cls)
        REGISTRY.register(desc)
        original = cls.__dict__.get("__init__")

        def __init__(self: Any, *args: Any, **kw: Any) -> None:
            provide = _provider()
            if provide is None:
                raise ChainsError(
                    "chainlets cannot be instantiated directly; use chains.run_local() "
                    "to run them locally, or deploy the chain", chainlet=cls.__name__)
            if args:
                raise ChainsError("chainlets take keyword arguments only",
                                  chainlet=cls.__name__)
            for arg, marker in desc.dependencies.items():
                if arg not in kw:
                    kw[arg] = provide(marker)
            if desc.has_context and "context" not in kw:
                kw["context"] = provide(ContextMarker())
            if original is not None:
                original(self, **kw)

        # describe() reads the user's __init__, not this wrapper.
        __init__.__wrapped__ = original or object.__init__  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    def run_remote(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


@contextlib.contextmanager
def provided(provide: Any) -> Iterator[None]:
    """Construct chainlets on this thread with ``provide(marker)`` for each dependency."""
    before = _provider()
    _local.provider = provide
    try:
        yield
    finally:
        _local.provider = before


@contextlib.contextmanager
def run_local(secrets: Mapping[str, str] | None = None, data_dir: pathlib.Path | None = None,
              chainlet_to_service: Mapping[str, DeployedServiceDescriptor] | None = None,
              ) -> Iterator[DeploymentContext]:
    """Run chainlets in this process: each dependency is a local instance (one per class,
    shared, as one deployment serves every caller), unless given as a keyword (a mock)."""
    context = DeploymentContext(data_dir=data_dir, secrets=dict(secrets or {}),
                                chainlet_to_service=dict(chainlet_to_service or {}))
    instances: dict[type, Any] = {}

    def provide(marker: Any) -> Any:
        if isinstance(marker, ContextMarker):
            return context
        cls = marker.chainlet_cls
        if cls not in instances:
            instances[cls] = cls()
        return instances[cls]

    with provided(provide):
        yield context
