"""A deployment's ``resources:``: validated, matched to an instance type, and turned into
what a cluster scheduler needs.

The fields and their meaning are Baseten's (``config.yaml`` ``resources:``, see the
"Resources" reference): ``accelerator`` (``L4``, ``H100:2``), ``cpu`` (``"4"``, ``"500m"``),
``memory`` (``16Gi``), ``use_gpu``, or an exact ``instance_type`` in ``L4:4x16`` form (then
the other fields are ignored). Without ``instance_type`` the *smallest instance that fits*
is chosen: same accelerator, at least as many GPUs, CPUs and GiB, cheapest first. So
``cpu: "3"`` lands on a 4-core instance, exactly as the reference says.

The catalogue is data (``instance_types.json`` beside this module, or any file with the
same fields), not code: an operator with other hardware swaps the file. Everything here is
pure (no I/O except reading the catalogue once), so push-time validation, the local backend
(validates and reports ``instance_type_name``) and the Kubernetes backend (requests, limits,
node selector, tolerations) all agree on one answer, and tests can table-drive it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any

from control.errors import RequestError

CATALOGUE_PATH = Path(__file__).with_name("instance_types.json")
GPU_RESOURCE = "nvidia.com/gpu"
# Nodes carrying an accelerator are labelled with its name (e.g. ``bdn.dev/accelerator=L4``)
# by the operator or by a node-feature rule; GPU nodes are usually tainted so that only
# pods asking for a GPU land there.
ACCELERATOR_LABEL = "bdn.dev/accelerator"
GPU_TAINT_KEY = "nvidia.com/gpu"
# Truss's defaults when nothing is given: one core, 2 GiB.
DEFAULT_CPU_MILLI = 1000
DEFAULT_MEMORY_BYTES = 2 * 2**30
MAX_GPUS = 8
KNOWN_FIELDS = frozenset({"accelerator", "cpu", "memory", "use_gpu", "instance_type",
                          "node_count"})
# Accepted spellings of accelerators that Baseten names two ways.
ACCELERATOR_ALIASES = {"H100MIG": "H100_40GB"}

_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
                    "Ei": 2**60}
_DECIMAL_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
                     "E": 10**18}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)$")
_ACCELERATOR = re.compile(r"^([A-Za-z0-9_]+)(?::([0-9]+))?$")


class ResourcesError(RequestError):
    """``resources`` is invalid; ``field`` is the full name (``resources.cpu``)."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message, field=field)


@dataclass(frozen=True)
class InstanceType:
    """One row of the catalogue. ``cpu``/``memory_gib`` None: no fixed figure."""

    name: str
    accelerator: str | None
    gpus: int
    cpu: float | None
    memory_gib: float | None
    vram_gib: float
    usd_per_min: float

    def __post_init__(self) -> None:
        if self.gpus < 0 or (self.accelerator is None) != (self.gpus == 0):
            raise ResourcesError(f"instance type {self.name}: an accelerator needs gpus >= 1 "
                                 "and a CPU instance 0", field="instance_types.gpus")


@dataclass(frozen=True)
class ResourceRequest:
    """What a deployment asked for, normalised. ``instance_type`` set: an exact pick."""

    accelerator: str | None = None
    gpus: int = 0
    cpu_milli: int = DEFAULT_CPU_MILLI
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    instance_type: str | None = None

    def __post_init__(self) -> None:
        if (self.accelerator is None) != (self.gpus == 0):
            raise ResourcesError("an accelerator needs a GPU count of at least 1",
                                 field="resources.accelerator")
        if self.cpu_milli <= 0:
            raise ResourcesError("must be positive", field="resources.cpu")
        if self.memory_bytes <= 0:
            raise ResourcesError("must be positive", field="resources.memory")


@dataclass(frozen=True)
class KubeResources:
    """What a pod needs to land on the right node with the right share of it."""

    requests: dict[str, str]
    limits: dict[str, str]
    node_selector: dict[str, str]
    tolerations: tuple[dict[str, str], ...]


def load_catalogue(path: Path = CATALOGUE_PATH) -> tuple[InstanceType, ...]:
    """Read a catalogue file; every row validated, names unique."""
    try:
        data = json.loads(path.read_text())
        rows = data["instance_types"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResourcesError(f"cannot read the catalogue {path}: {e}",
                             field="instance_types") from None
    types: list[InstanceType] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        try:
            it = InstanceType(name=str(row["name"]), accelerator=row["accelerator"],
                              gpus=int(row["gpus"]), cpu=row["cpu"],
                              memory_gib=row["memory_gib"], vram_gib=float(row["vram_gib"]),
                              usd_per_min=float(row["usd_per_min"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ResourcesError(f"row {i} of {path} is malformed: {e!r}",
                                 field=f"instance_types[{i}]") from None
        if it.name in seen:
            raise ResourcesError(f"{it.name} appears twice in {path}",
                                 field=f"instance_types[{i}].name")
        seen.add(it.name)
        types.append(it)
    return tuple(types)


@cache
def default_catalogue() -> tuple[InstanceType, ...]:
    return load_catalogue(CATALOGUE_PATH)


def accelerators(catalogue: Sequence[InstanceType]) -> list[str]:
    return sorted({t.accelerator for t in catalogue if t.accelerator})


def parse_cpu(value: object, field: str = "resources.cpu") -> int:
    """``"4"``, ``4``, ``0.5``, ``"500m"`` → millicores."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ResourcesError(f"must be a number of cores such as \"4\" or \"500m\", "
                             f"not {value!r}", field=field)
    text = str(value).strip()
    milli = text.endswith("m")
    try:
        amount = Decimal(text[:-1] if milli else text)
    except InvalidOperation:
        raise ResourcesError(f"must be a number of cores such as \"4\" or \"500m\", "
                             f"not {value!r}", field=field) from None
    if not amount.is_finite() or amount <= 0:
        raise ResourcesError(f"must be positive, not {value!r}", field=field)
    result = amount if milli else amount * 1000
    if result != result.to_integral_value():
        raise ResourcesError(f"finer than a millicore: {value!r}", field=field)
    return int(result)


def parse_memory(value: object, field: str = "resources.memory") -> int:
    """Kubernetes quantities: ``16Gi``, ``512Mi``, ``16G``, ``1.5Gi``, bytes → bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ResourcesError(f"must be a size such as \"16Gi\", not {value!r}", field=field)
    m = _QUANTITY.match(str(value).strip())
    suffix = m.group(2) if m else ""
    scale = _BINARY_SUFFIXES.get(suffix) or _DECIMAL_SUFFIXES.get(suffix)
    if m is None or scale is None:
        raise ResourcesError(f"must be a size such as \"16Gi\" or \"512Mi\" (suffixes "
                             f"{', '.join(k for k in _BINARY_SUFFIXES)}, "
                             f"{', '.join(k for k in _DECIMAL_SUFFIXES if k)}), "
                             f"not {value!r}", field=field)
    result = Decimal(m.group(1)) * scale
    if result <= 0:
        raise ResourcesError(f"must be positive, not {value!r}", field=field)
    if result != result.to_integral_value():
        raise ResourcesError(f"not a whole number of bytes: {value!r}", field=field)
    return int(result)


def parse_accelerator(value: object, catalogue: Sequence[InstanceType],
                      field: str = "resources.accelerator") -> tuple[str, int]:
    """``L4`` → (L4, 1); ``H100:2`` → (H100, 2). Names compared case-insensitively."""
    known = accelerators(catalogue)
    if not isinstance(value, str) or not (m := _ACCELERATOR.match(value.strip())):
        raise ResourcesError(f"must be NAME or NAME:COUNT such as \"L4\" or \"H100:2\", "
                             f"not {value!r}", field=field)
    name = m.group(1).upper()
    name = ACCELERATOR_ALIASES.get(name, name)
    canonical = {k.upper(): k for k in known}.get(name)
    if canonical is None:
        raise ResourcesError(f"unknown accelerator {m.group(1)!r} (known: {', '.join(known)})",
                             field=field)
    count = int(m.group(2)) if m.group(2) is not None else 1
    if not 1 <= count <= MAX_GPUS:
        raise ResourcesError(f"GPU count must be 1-{MAX_GPUS}, not {count}", field=field)
    return canonical, count


def parse_resources(data: Mapping[str, Any] | None,
                    catalogue: Sequence[InstanceType] | None = None) -> ResourceRequest:
    """Validate ``resources:`` as pushed; every error names the field."""
    catalogue = default_catalogue() if catalogue is None else catalogue
    if data is None:
        return ResourceRequest()
    if not isinstance(data, Mapping):
        raise ResourcesError(f"must be a mapping, not {type(data).__name__}",
                             field="resources")
    unknown = sorted(str(k) for k in data if k not in KNOWN_FIELDS)
    if unknown:
        raise ResourcesError(f"unknown field (known: {', '.join(sorted(KNOWN_FIELDS))})",
                             field=f"resources.{unknown[0]}")
    node_count = data.get("node_count")
    if node_count is not None and node_count != 1:
        raise ResourcesError("only single-node instances are supported (1)",
                             field="resources.node_count")
    instance_type = data.get("instance_type")
    if instance_type is not None:
        # The reference: with instance_type, the other fields are ignored.
        if not isinstance(instance_type, str):
            raise ResourcesError(f"must be a name such as \"L4:4x16\", not {instance_type!r}",
                                 field="resources.instance_type")
        it = find_instance_type(instance_type, catalogue)
        return ResourceRequest(
            accelerator=it.accelerator, gpus=it.gpus,
            cpu_milli=int((it.cpu or 0) * 1000) or DEFAULT_CPU_MILLI,
            memory_bytes=int((it.memory_gib or 0) * 2**30) or DEFAULT_MEMORY_BYTES,
            instance_type=it.name)
    use_gpu = data.get("use_gpu")
    if use_gpu is not None and not isinstance(use_gpu, bool):
        raise ResourcesError(f"must be true or false, not {use_gpu!r}",
                             field="resources.use_gpu")
    accelerator, gpus = None, 0
    if data.get("accelerator") is not None:
        if use_gpu is False:
            raise ResourcesError("is false but resources.accelerator names a GPU",
                                 field="resources.use_gpu")
        accelerator, gpus = parse_accelerator(data["accelerator"], catalogue)
    elif use_gpu:
        raise ResourcesError("use_gpu: true needs an accelerator such as \"L4\"",
                             field="resources.accelerator")
    cpu = DEFAULT_CPU_MILLI if data.get("cpu") is None else parse_cpu(data["cpu"])
    memory = (DEFAULT_MEMORY_BYTES if data.get("memory") is None
              else parse_memory(data["memory"]))
    return ResourceRequest(accelerator=accelerator, gpus=gpus, cpu_milli=cpu,
                           memory_bytes=memory)


def find_instance_type(name: str, catalogue: Sequence[InstanceType]) -> InstanceType:
    wanted = name.strip().upper()
    for it in catalogue:
        if it.name.upper() == wanted:
            return it
    examples = ", ".join(t.name for t in catalogue[:: max(1, len(catalogue) // 6)])
    raise ResourcesError(f"unknown instance type {name!r}: the form is "
                         f"ACCELERATOR:CPUxGiB (or ACCELERATOR:GPUSxCPUxGiB), e.g. {examples}",
                         field="resources.instance_type")


def fits(it: InstanceType, req: ResourceRequest) -> bool:
    if it.accelerator != req.accelerator or it.gpus < req.gpus:
        return False
    if it.cpu is not None and it.cpu * 1000 < req.cpu_milli:
        return False
    return it.memory_gib is None or it.memory_gib * 2**30 >= req.memory_bytes


def choose_instance_type(req: ResourceRequest,
                         catalogue: Sequence[InstanceType] | None = None) -> InstanceType:
    """The smallest (cheapest, then fewest GPUs, then name) instance type that fits."""
    catalogue = default_catalogue() if catalogue is None else catalogue
    if req.instance_type is not None:
        return find_instance_type(req.instance_type, catalogue)
    candidates = [it for it in catalogue if fits(it, req)]
    if not candidates:
        what = f"{req.gpus}x {req.accelerator}" if req.accelerator else "no GPU"
        raise ResourcesError(
            f"no instance type has {what} with {req.cpu_milli / 1000:g} CPUs and "
            f"{req.memory_bytes / 2**30:g} GiB", field="resources")
    return min(candidates, key=lambda it: (it.usd_per_min, it.gpus, it.name))


def instance_type_for(data: Mapping[str, Any] | None,
                      catalogue: Sequence[InstanceType] | None = None) -> InstanceType:
    """``resources:`` as pushed → the instance type it runs on (``instance_type_name``)."""
    return choose_instance_type(parse_resources(data, catalogue), catalogue)


def kube_resources(it: InstanceType, req: ResourceRequest, *,
                   gpu_resource: str = GPU_RESOURCE,
                   accelerator_label: str = ACCELERATOR_LABEL) -> KubeResources:
    """Requests/limits, node selector and tolerations for one replica on ``it``.

    CPU and memory are requested at the instance's size (that is what the deployment pays
    for); where the catalogue gives no figure, at what the deployment asked. Memory is
    also the limit (a pod past it is killed rather than starving its neighbours); CPU has
    no limit (throttling a loader only slows the cold start). GPUs are extended resources:
    Kubernetes wants request == limit. Quantities are strings: the Python client refuses
    integers.
    """
    cpu_milli = int(it.cpu * 1000) if it.cpu is not None else req.cpu_milli
    memory = int(it.memory_gib * 2**30) if it.memory_gib is not None else req.memory_bytes
    requests = {"cpu": f"{cpu_milli}m", "memory": str(memory)}
    limits = {"memory": str(memory)}
    selector: dict[str, str] = {}
    tolerations: tuple[dict[str, str], ...] = ()
    if it.gpus:
        requests[gpu_resource] = limits[gpu_resource] = str(it.gpus)
        assert it.accelerator is not None
        selector[accelerator_label] = it.accelerator
        tolerations = ({"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"},)
    return KubeResources(requests=requests, limits=limits, node_selector=selector,
                         tolerations=tolerations)
