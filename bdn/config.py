"""The ``weights:`` section of a Truss-style ``config.yaml``, parsed and validated.

The same document a user already writes for Truss says what bdn delivers::

    weights:
      - source: hf://meta-llama/Llama-3.1-8B@main
        mount_location: /models/llama
        allow_patterns: ["*.safetensors", "config.json"]
        auth_secret_name: hf_access_token
      - source: s3://bucket/models/x
        mount_location: /models/x
        auth: {auth_method: AWS_OIDC, aws_oidc_role_arn: ..., aws_oidc_region: us-east-1}

Validation happens here, once, with errors that name the entry index and field and read
like Truss's own, so a bad config fails at push time rather than on a GPU node. The
verdicts are Truss 0.18's (``tests/truss/test_truss_config_parity.py`` feeds the same
documents to both parsers); where bdn refuses more (overlapping or escaping mounts,
``..`` in sources, malformed secret names or patterns) or accepts more (``file://``),
that test lists the case and the reason. Parsing
is pure (a dict in, records out); :func:`load_model_config` is the one reader of files.
"""

from __future__ import annotations

import re
import reprlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from bdn.errors import ConfigError
from bdn.patterns import MAX_PATTERNS, PatternError, compile_glob

# An error quotes at most this much of an offending value.
MAX_QUOTE_CHARS = 200
MAX_CONFIG_DEPTH = 64
# Values in a config.yaml after aliases are expanded; real ones have hundreds.
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_BYTES = 4 << 20
# Truss 0.18's schemes, and bdn's ``file://`` (a local folder: the embedded default).
SUPPORTED_SCHEMES = ("hf", "s3", "gs", "r2", "cw", "azure", "https", "file")
BUCKET_SCHEMES = ("s3", "gs", "r2", "cw", "azure")
AUTH_METHODS = ("CUSTOM_SECRET", "AWS_OIDC", "GCP_OIDC", "AWS_ASSUME_ROLE")
# Fields each auth method requires; every other auth field is refused for that method.
AUTH_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "CUSTOM_SECRET": ("auth_secret_name",),
    "AWS_OIDC": ("aws_oidc_role_arn", "aws_oidc_region"),
    "GCP_OIDC": ("gcp_oidc_service_account", "gcp_oidc_workload_id_provider"),
    "AWS_ASSUME_ROLE": ("aws_assume_role_arn", "aws_assume_role_region"),
}
AUTH_FIELDS = frozenset(f for fs in AUTH_REQUIRED_FIELDS.values() for f in fs) | {"auth_method"}
ENTRY_FIELDS = frozenset({"source", "mount_location", "allow_patterns", "ignore_patterns",
                          "auth", "auth_secret_name"})
_HF_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
# A secret name, optionally prefixed by the namespace it belongs to (``team-a/hf``): the
# mirror service resolves a job's secrets in its own namespace only (bdn.secrets).
_SECRET_NAME_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,127}/)?[A-Za-z0-9_.-]{1,253}")


def _clip(text: str) -> str:
    """``text`` cut to ``MAX_QUOTE_CHARS``: an error quotes enough to find the value,
    never a megabyte of it."""
    return text if len(text) <= MAX_QUOTE_CHARS else \
        f"{text[:MAX_QUOTE_CHARS]}… ({len(text)} characters)"


_QUOTE = reprlib.Repr()
_QUOTE.maxlevel = 3
_QUOTE.maxstring = _QUOTE.maxother = MAX_QUOTE_CHARS
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 8


def _short(value: Any) -> str:
    """A bounded ``repr`` of ``value``: a YAML alias bomb would otherwise expand into an
    exponentially long message."""
    return _clip(_QUOTE.repr(value))


def check_document_shape(doc: Any, *, where: str = "config") -> None:
    """Refuse documents nested deeper than ``MAX_CONFIG_DEPTH`` or that expand to more
    than ``MAX_CONFIG_NODES`` values. YAML aliases share one object among many places, so
    a small file can stand for billions of values (the "billion laughs"); anything that
    later walks or prints the document would pay for all of them. Iterative, and each
    shared object is sized once, so the check itself is cheap."""
    expanded: dict[int, int] = {}
    # (node, depth, children done?) — an explicit stack, so depth cannot exhaust ours.
    stack: list[tuple[Any, int, bool]] = [(doc, 0, False)]
    while stack:
        node, depth, done = stack.pop()
        if not isinstance(node, dict | list):
            continue
        children = list(node.values()) if isinstance(node, dict) else node
        if done:
            total = 1 + sum(expanded.get(id(c), 1) for c in children)
            if total > MAX_CONFIG_NODES:
                raise ConfigError(f"{where} expands to more than {MAX_CONFIG_NODES} values "
                                  "(YAML aliases repeated too often?)")
            expanded[id(node)] = total
            continue
        if depth >= MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where} is nested more than {MAX_CONFIG_DEPTH} levels deep")
        if id(node) in expanded:
            continue
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children)


@dataclass(frozen=True)
class Auth:
    """How to authenticate to a source. Holds secret *names*, never secret values."""

    auth_method: str
    auth_secret_name: str | None = None
    aws_oidc_role_arn: str | None = None
    aws_oidc_region: str | None = None
    gcp_oidc_service_account: str | None = None
    gcp_oidc_workload_id_provider: str | None = None
    aws_assume_role_arn: str | None = None
    aws_assume_role_region: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class SourceURI:
    """A parsed source: ``scheme``, ``location`` (bucket/repo + path) and HF ``revision``."""

    uri: str
    scheme: str
    location: str
    revision: str | None = None

    @property
    def bucket(self) -> str:
        return self.location.split("/", 1)[0]

    @property
    def prefix(self) -> str:
        parts = self.location.split("/", 1)
        return parts[1].strip("/") if len(parts) > 1 else ""


@dataclass(frozen=True)
class WeightsEntry:
    """One item of ``weights:``."""

    source: SourceURI
    mount_location: str
    allow_patterns: tuple[str, ...] = ()
    ignore_patterns: tuple[str, ...] = ()
    auth: Auth | None = None

    @property
    def secret_name(self) -> str | None:
        return self.auth.auth_secret_name if self.auth else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source.uri, "mount_location": self.mount_location}
        if self.allow_patterns:
            out["allow_patterns"] = list(self.allow_patterns)
        if self.ignore_patterns:
            out["ignore_patterns"] = list(self.ignore_patterns)
        if self.auth:
            out["auth"] = self.auth.to_dict()
        return out


@dataclass(frozen=True)
class ModelConfig:
    """The parts of ``config.yaml`` bdn uses; everything else is kept in ``raw``."""

    model_name: str | None
    weights: tuple[WeightsEntry, ...]
    predict_concurrency: int = 1
    resources: dict[str, Any] = field(default_factory=dict)
    environment_variables: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, Any] = field(default_factory=dict)
    model_metadata: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    # Truss's folder layout, relative to the model folder (Truss's defaults).
    model_module_dir: str = "model"
    model_class_filename: str = "model.py"
    model_class_name: str = "Model"
    data_dir: str = "data"
    bundled_packages_dir: str = "packages"
    external_package_dirs: tuple[str, ...] = ()
    # pip requirement lines: recorded and reported, never installed (see serving.runtime).
    requirements: tuple[str, ...] = ()


def parse_source(value: Any, *, index: int | None = None) -> SourceURI:
    """Parse a ``source`` URI with Truss-like errors (and Truss's verdicts: the scheme is
    lowercase, nothing around the URI)."""
    fld = "source"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"source must be a non-empty string, got {_short(value)}",
                          index=index, field=fld)
    text = value
    if text != text.strip():
        raise ConfigError(f"Source {_short(text)} has spaces before or after the URI",
                          index=index, field=fld)
    if "://" not in text:
        raise ConfigError(f"Source '{_clip(text)}' is missing a URI scheme. Supported schemes: "
                          f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)}",
                          index=index, field=fld)
    scheme, rest = text.split("://", 1)
    if scheme not in SUPPORTED_SCHEMES:
        hint = f" (write it lowercase: {scheme.lower()}://)" \
            if scheme.lower() in SUPPORTED_SCHEMES else ""
        raise ConfigError(f"Source '{_clip(text)}' has unsupported scheme '{scheme}://'{hint}. "
                          f"Supported schemes: {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}",
                          index=index, field=fld)
    revision = None
    if scheme == "hf":
        if "@" in rest:
            rest, revision = rest.rsplit("@", 1)
            if not _REVISION_RE.fullmatch(revision) or ".." in revision:
                raise ConfigError(f"Source '{_clip(text)}' has an empty or invalid revision "
                                  "after @", index=index, field=fld)
        if not _HF_REPO_RE.fullmatch(rest):
            raise ConfigError(f"Source '{_clip(text)}' is not a Hugging Face repository: expected "
                              "hf://owner/repo[@revision]", index=index, field=fld)
    elif "@" in rest and scheme in (*BUCKET_SCHEMES, "file"):
        raise ConfigError(f"Source '{_clip(text)}': The @ revision syntax is only valid for "
                          "HuggingFace sources (hf://)", index=index, field=fld)
    if scheme == "file":
        if not rest.startswith("/"):
            raise ConfigError(f"Source '{_clip(text)}': file:// sources need an absolute path "
                              "(file:///path/to/dir)", index=index, field=fld)
    elif scheme == "https":
        parts = urlsplit(text)
        if not parts.hostname or rest.startswith("/"):
            raise ConfigError(f"Source '{_clip(text)}' has no host", index=index, field=fld)
    elif not rest or rest.startswith("/"):
        what = "bucket" if scheme in BUCKET_SCHEMES else "repository"
        raise ConfigError(f"Source '{_clip(text)}' is missing a {what} name after {scheme}://",
                          index=index, field=fld)
    if any(seg in ("..", ".") for seg in rest.split("/")[1:]):
        raise ConfigError(f"Source '{_clip(text)}' contains '.' or '..' path segments",
                          index=index, field=fld)
    return SourceURI(uri=text, scheme=scheme, location=rest, revision=revision)


def _patterns(entry: dict[str, Any], name: str, index: int) -> tuple[str, ...]:
    # A list, as Truss requires (a bare string is refused there too): a YAML scalar where
    # a list was meant is more often a mistake than a one-pattern shorthand.
    value = entry.get(name)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list of glob strings (e.g. [\"*.json\"]), got "
                          f"{_short(value)}", index=index, field=name)
    if len(value) > MAX_PATTERNS:
        raise ConfigError(f"at most {MAX_PATTERNS} patterns, got {len(value)}",
                          index=index, field=name)
    for k, pattern in enumerate(value):
        if not isinstance(pattern, str):
            raise ConfigError(f"a pattern must be a string, got {_short(pattern)}",
                              index=index, field=f"{name}[{k}]")
        try:
            compile_glob(pattern)
        except PatternError as e:
            raise ConfigError(str(e), index=index, field=f"{name}[{k}]") from None
    return tuple(value)


def _secret_name(value: Any, index: int, fld: str) -> str:
    # Truss's own rule for secret names (Kubernetes object names, as in its build
    # secrets), plus bdn's optional "namespace/" prefix; checked at parse time because
    # the name becomes a file name under the secrets folder and an environment variable.
    if not isinstance(value, str) or not _SECRET_NAME_RE.fullmatch(value) \
            or value.rsplit("/", 1)[-1] in (".", ".."):
        raise ConfigError(f"{fld.rsplit('.', 1)[-1]} must be a secret name of letters, digits, "
                          f"'_', '-' or '.' (optionally prefixed by 'namespace/'), got "
                          f"{_short(value)}", index=index, field=fld)
    return value


def _absent(value: Any) -> bool:
    """Truss treats a field set to ``null`` or ``""`` as not given."""
    return value is None or value == ""


def parse_auth(entry: dict[str, Any], index: int) -> Auth | None:
    block = entry.get("auth")
    shortcut = entry.get("auth_secret_name")
    if shortcut is not None and not isinstance(shortcut, str):
        raise ConfigError(f"auth_secret_name must be a string, got {_short(shortcut)}",
                          index=index, field="auth_secret_name")
    if block is not None and not _absent(shortcut):
        raise ConfigError("auth_secret_name cannot be combined with an auth block; put "
                          "auth_secret_name inside auth (auth_method: CUSTOM_SECRET)",
                          index=index, field="auth_secret_name")
    if not _absent(shortcut):
        return Auth(auth_method="CUSTOM_SECRET",
                    auth_secret_name=_secret_name(shortcut, index, "auth_secret_name"))
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ConfigError(f"auth must be a mapping, got {_short(block)}", index=index, field="auth")
    method = block.get("auth_method")
    # Any case, as Truss upper-cases it ("aws_oidc" is AWS_OIDC).
    method = method.upper() if isinstance(method, str) else method
    if method not in AUTH_METHODS:
        raise ConfigError(f"auth_method must be one of {', '.join(AUTH_METHODS)}, got "
                          f"{_short(block.get('auth_method'))}", index=index,
                          field="auth.auth_method")
    unknown = set(block) - AUTH_FIELDS
    if unknown:
        raise ConfigError(f"unknown field(s) {_clip(', '.join(sorted(map(str, unknown))))}",
                          index=index, field="auth")
    for name in AUTH_FIELDS - {"auth_method"}:
        if not isinstance(block.get(name), str | None):
            raise ConfigError(f"{name} must be a string, got {_short(block[name])}",
                              index=index, field=f"auth.{name}")
    required = AUTH_REQUIRED_FIELDS[method]
    for name in required:
        if _absent(block.get(name)):
            raise ConfigError(f"{name} is required when auth_method is {method}",
                              index=index, field=f"auth.{name}")
    for name in sorted(AUTH_FIELDS - {"auth_method", *required}):
        if not _absent(block.get(name)):
            raise ConfigError(f"{name} is not allowed when auth_method is {method}",
                              index=index, field=f"auth.{name}")
    if method == "CUSTOM_SECRET":
        _secret_name(block["auth_secret_name"], index, "auth.auth_secret_name")
    return Auth(**{**{k: v for k, v in block.items() if not _absent(v)},
                   "auth_method": method})


def parse_mount_location(value: Any, index: int) -> str:
    fld = "mount_location"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"mount_location is required and must be a string, got {_short(value)}",
                          index=index, field=fld)
    if not value.startswith("/"):
        raise ConfigError(f"mount_location must be an absolute path (start with /), got: "
                          f"{_clip(value)}", index=index, field=fld)
    parts = PurePosixPath(value).parts
    if ".." in value.split("/") or "\x00" in value:
        raise ConfigError(f"mount_location must not contain '..' or NUL, got: {_clip(value)}",
                          index=index, field=fld)
    if len(parts) < 2:
        raise ConfigError("mount_location cannot be the root directory /",
                          index=index, field=fld)
    return str(PurePosixPath(*parts))


def parse_weights(items: Any) -> tuple[WeightsEntry, ...]:
    """Validate a ``weights:`` list; errors name ``weights[i].field``."""
    if items is None:
        return ()
    if not isinstance(items, list):
        raise ConfigError(f"weights must be a list of entries, got {type(items).__name__}",
                          field="weights")
    entries: list[WeightsEntry] = []
    mounts: dict[str, int] = {}
    for i, entry in enumerate(items):
        if not isinstance(entry, dict):
            raise ConfigError(f"entry must be a mapping, got {_short(entry)}", index=i)
        unknown = set(entry) - ENTRY_FIELDS
        if unknown:
            names = _clip(", ".join(sorted(map(str, unknown))))
            raise ConfigError(f"unknown field(s) {names}; known: "
                              f"{', '.join(sorted(ENTRY_FIELDS))}", index=i)
        if "source" not in entry:
            raise ConfigError("source is required", index=i, field="source")
        source = parse_source(entry["source"], index=i)
        mount = parse_mount_location(entry.get("mount_location"), i)
        for prev, j in mounts.items():
            if prev == mount:
                raise ConfigError(f"mount_location {mount} is already used by weights[{j}]",
                                  index=i, field="mount_location")
            if mount.startswith(prev + "/") or prev.startswith(mount + "/"):
                raise ConfigError(f"mount_location {mount} is nested with weights[{j}]'s "
                                  f"{prev}", index=i, field="mount_location")
        mounts[mount] = i
        entries.append(WeightsEntry(
            source=source, mount_location=mount,
            allow_patterns=_patterns(entry, "allow_patterns", i),
            ignore_patterns=_patterns(entry, "ignore_patterns", i),
            auth=parse_auth(entry, i)))
    return tuple(entries)


class ConfigDeprecationWarning(FutureWarning):
    """A ``config.yaml`` form bdn still reads but will not for ever. A ``FutureWarning``
    (Python's category for deprecations meant for end users), so ``bdn serve`` and
    ``bdn push`` show it without any warnings filter: a ``DeprecationWarning`` raised
    outside ``__main__`` is hidden by default."""


def _predict_concurrency(value: Any, fld: str) -> int:
    # An integer, or its digits as a string (pydantic's lax reading, as Truss has it).
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if type(value) is not int or value < 1:
        raise ConfigError(f"predict_concurrency must be an integer ≥ 1, got {_short(value)}",
                          field=fld)
    return value


def _str_list(doc: dict[str, Any], name: str) -> tuple[str, ...]:
    v = doc.get(name)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{name} must be a list of strings, got {_short(v)}", field=name)
    return tuple(v)


def _relative_dir(doc: dict[str, Any], name: str, default: str) -> str:
    v = doc.get(name, default)
    if not isinstance(v, str) or not v or v.startswith("/") or ".." in v.split("/"):
        raise ConfigError(f"{name} must be a folder inside the model folder, got {_short(v)}",
                          field=name)
    return v


def parse_model_config(doc: Any) -> ModelConfig:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError("config.yaml must be a mapping at the top level")
    check_document_shape(doc, where="config.yaml")

    def mapping(name: str) -> dict[str, Any]:
        v = doc.get(name) or {}
        if not isinstance(v, dict):
            raise ConfigError(f"{name} must be a mapping, got {_short(v)}", field=name)
        return v

    runtime = mapping("runtime")
    if "predict_concurrency" in runtime:
        pc = _predict_concurrency(runtime["predict_concurrency"], "runtime.predict_concurrency")
    else:
        pc = 1
    if "predict_concurrency" in doc:
        # bdn once read it at the top level; Truss reads runtime.predict_concurrency only.
        warnings.warn("config.yaml: top-level predict_concurrency is deprecated (Truss does "
                      "not read it); move it under runtime:", ConfigDeprecationWarning,
                      stacklevel=2)
        top = _predict_concurrency(doc["predict_concurrency"], "predict_concurrency")
        if "predict_concurrency" not in runtime:
            pc = top
    name = doc.get("model_name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"model_name must be a string, got {_short(name)}", field="model_name")
    if "weights" in doc and doc["weights"] is None:
        raise ConfigError("weights must be a list of entries (write weights: [] for none), "
                          "got null", field="weights")
    weights = parse_weights(doc.get("weights"))
    model_cache = doc.get("model_cache", doc.get("hf_cache"))
    if model_cache and weights:
        raise ConfigError("only one of model_cache and weights may be given (model_cache is "
                          "Truss's older form of weights)", field="model_cache")
    secrets = mapping("secrets")
    for k, v in secrets.items():
        if not isinstance(k, str) or not isinstance(v, str | None):
            raise ConfigError(f"secrets maps a name to a placeholder string or null, got "
                              f"{_short(k)}: {_short(v)}", field="secrets")
    env = {str(k): str(v).lower() if isinstance(v, bool) else str(v)
           for k, v in mapping("environment_variables").items()}
    return ModelConfig(
        model_name=name, weights=weights, predict_concurrency=pc,
        resources=mapping("resources"), environment_variables=env,
        secrets=secrets, model_metadata=mapping("model_metadata"), raw=doc,
        model_module_dir=_relative_dir(doc, "model_module_dir", "model"),
        model_class_filename=_relative_dir(doc, "model_class_filename", "model.py"),
        model_class_name=_class_name(doc.get("model_class_name", "Model")),
        data_dir=_relative_dir(doc, "data_dir", "data"),
        bundled_packages_dir=_relative_dir(doc, "bundled_packages_dir", "packages"),
        external_package_dirs=_str_list(doc, "external_package_dirs"),
        requirements=_str_list(doc, "requirements"))


def _class_name(v: Any) -> str:
    if not isinstance(v, str) or not v.isidentifier():
        raise ConfigError(f"model_class_name must be a Python identifier, got {_short(v)}",
                          field="model_class_name")
    return v


class _DuplicateKeyWarningLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that warns about a key given twice in one mapping (the last one
    is used), as Truss's loader does: PyYAML alone keeps the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: construct_mapping reports it
                break
            if duplicate:
                warnings.warn(f"config.yaml has the key {_short(key)} twice in one mapping "
                              f"(line {key_node.start_mark.line + 1}); the last one is used",
                              UserWarning, stacklevel=2)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_document(path: str | Path) -> Any:
    """The parsed YAML of a ``config.yaml`` (or a model folder containing one), bounded:
    size, nesting and alias expansion are checked, and every error is a short
    :class:`ConfigError`. The one place bdn reads a config file."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.yaml"
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = yaml.load(raw.decode("utf-8"), Loader=_DuplicateKeyWarningLoader)  # safe
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not UTF-8 (byte offset {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{p} is nested too deeply (more than {MAX_CONFIG_DEPTH} "
                          "levels)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p} is not valid YAML{where}") from None
    check_document_shape(doc, where=str(p))
    return doc


def load_model_config(path: str | Path) -> ModelConfig:
    """Read a ``config.yaml`` (or a model folder containing one)."""
    return parse_model_config(read_config_document(path))
