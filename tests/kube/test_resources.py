"""``resources:`` validation and instance-type choice, table-driven (control/resources.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from control.errors import RequestError
from control.resources import (
    ResourcesError,
    choose_instance_type,
    default_catalogue,
    instance_type_for,
    kube_resources,
    load_catalogue,
    parse_resources,
)

# (resources as pushed, the instance type chosen)
VALID: list[tuple[dict[str, Any] | None, str]] = [
    (None, "CPU:1x2"),
    ({}, "CPU:1x2"),
    ({"cpu": "1", "memory": "2Gi"}, "CPU:1x2"),
    ({"cpu": "3"}, "CPU:4x16"),                          # the reference: 3 or 4 → 4 cores
    ({"cpu": "4"}, "CPU:4x16"),
    ({"cpu": "5"}, "CPU:8x32"),                          # 5 to 8 → 8 cores
    ({"cpu": "500m", "memory": "3Gi"}, "CPU:1x4"),
    ({"cpu": 2, "memory": "8Gi"}, "CPU:2x8"),
    ({"memory": "8G"}, "CPU:2x8"),                       # 8 GB < 8 GiB
    ({"memory": "8.5Gi"}, "CPU:4x16"),
    ({"accelerator": "L4"}, "L4:4x16"),
    ({"accelerator": "l4", "cpu": "4", "memory": "16Gi"}, "L4:4x16"),
    ({"accelerator": "L4", "cpu": "5"}, "L4:2x24x96"),   # no 1-GPU L4 has 5 cores
    ({"accelerator": "L4:2"}, "L4:2x24x96"),
    ({"accelerator": "T4", "cpu": "6"}, "T4:8x32"),
    ({"accelerator": "A10G", "memory": "20Gi"}, "A10G:8x32"),
    ({"accelerator": "A100:3"}, "A100:3x36x432"),
    ({"accelerator": "H100"}, "H100"),
    ({"accelerator": "H100:2", "cpu": "32"}, "H100:2"),  # no CPU figure: fits any
    ({"accelerator": "H100:3"}, "H100:4"),
    ({"accelerator": "H100MIG"}, "H100_40GB"),
    ({"accelerator": "L4", "use_gpu": True}, "L4:4x16"),
    ({"instance_type": "L4:4x16"}, "L4:4x16"),
    ({"instance_type": "a100:2x24x288"}, "A100:2x24x288"),
    ({"instance_type": "CPU:8x32", "accelerator": "nonsense"}, "CPU:8x32"),  # others ignored
    ({"instance_type": "H100:8"}, "H100:8"),
]

# (resources as pushed, the field the error names, a fragment of its message)
INVALID: list[tuple[Any, str, str]] = [
    ("L4", "resources", "mapping"),
    ({"gpu": "L4"}, "resources.gpu", "unknown field"),
    ({"accelerator": "V100"}, "resources.accelerator", "unknown accelerator"),
    ({"accelerator": "L4:0"}, "resources.accelerator", "1-8"),
    ({"accelerator": "L4:9"}, "resources.accelerator", "1-8"),
    ({"accelerator": "L4:two"}, "resources.accelerator", "NAME:COUNT"),
    ({"accelerator": 4}, "resources.accelerator", "NAME:COUNT"),
    ({"accelerator": "L4:4", "cpu": "64"}, "resources", "no instance type"),
    ({"accelerator": "L4", "use_gpu": False}, "resources.use_gpu", "is false"),
    ({"use_gpu": True}, "resources.accelerator", "needs an accelerator"),
    ({"use_gpu": "yes", "accelerator": "L4"}, "resources.use_gpu", "true or false"),
    ({"cpu": "four"}, "resources.cpu", "number of cores"),
    ({"cpu": "0"}, "resources.cpu", "positive"),
    ({"cpu": "-2"}, "resources.cpu", "positive"),
    ({"cpu": True}, "resources.cpu", "number of cores"),
    ({"cpu": "0.0001"}, "resources.cpu", "millicore"),
    ({"cpu": "nan"}, "resources.cpu", "positive"),
    ({"cpu": "17"}, "resources", "no instance type"),
    ({"memory": "16GB"}, "resources.memory", "16Gi"),
    ({"memory": "lots"}, "resources.memory", "16Gi"),
    ({"memory": "0Gi"}, "resources.memory", "positive"),
    ({"memory": 1.5}, "resources.memory", "16Gi"),
    ({"memory": "65Gi"}, "resources", "no instance type"),
    ({"instance_type": "L4:4x17"}, "resources.instance_type", "unknown instance type"),
    ({"instance_type": "L4x4x16"}, "resources.instance_type", "ACCELERATOR:CPUxGiB"),
    ({"instance_type": 4}, "resources.instance_type", "L4:4x16"),
    ({"node_count": 2}, "resources.node_count", "single-node"),
]


@pytest.mark.parametrize(("spec", "chosen"), VALID, ids=[repr(v[0]) for v in VALID])
def test_valid_resources_choose_the_smallest_instance_that_fits(spec: Any, chosen: str) -> None:
    req = parse_resources(spec)
    assert choose_instance_type(req).name == chosen
    assert instance_type_for(spec).name == chosen


@pytest.mark.parametrize(("spec", "field", "fragment"), INVALID,
                         ids=[repr(v[0]) for v in INVALID])
def test_invalid_resources_name_the_field(spec: Any, field: str, fragment: str) -> None:
    with pytest.raises(ResourcesError) as info:
        choose_instance_type(parse_resources(spec))
    assert info.value.field == field
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"{field}: ")
    # The management API answers 400 with the same sentence.
    assert isinstance(info.value, RequestError) and info.value.status == 400


def test_the_catalogue_is_data_and_well_formed() -> None:
    catalogue = default_catalogue()
    names = [t.name for t in catalogue]
    assert len(names) == len(set(names))
    # Every catalogued instance type can be asked for by name and is chosen as itself.
    for it in catalogue:
        assert choose_instance_type(parse_resources({"instance_type": it.name})) == it


def test_a_catalogue_of_ones_own_replaces_the_default(tmp_path: Path) -> None:
    path = tmp_path / "types.json"
    path.write_text(json.dumps({"instance_types": [
        {"name": "L4:8x64", "accelerator": "L4", "gpus": 1, "cpu": 8, "memory_gib": 64,
         "vram_gib": 24, "usd_per_min": 1.0}]}))
    catalogue = load_catalogue(path)
    assert choose_instance_type(parse_resources({"accelerator": "L4"}, catalogue),
                                catalogue).name == "L4:8x64"
    with pytest.raises(ResourcesError, match="unknown accelerator 'T4'"):
        parse_resources({"accelerator": "T4"}, catalogue)
    path.write_text(json.dumps({"instance_types": [{"name": "x"}]}))
    with pytest.raises(ResourcesError) as info:
        load_catalogue(path)
    assert info.value.field == "instance_types[0]"


# (resources, requests, limits, node selector)
KUBE: list[tuple[dict[str, Any], dict[str, str], dict[str, str], dict[str, str]]] = [
    ({"accelerator": "L4"},
     {"cpu": "4000m", "memory": str(16 * 2**30), "nvidia.com/gpu": "1"},
     {"memory": str(16 * 2**30), "nvidia.com/gpu": "1"}, {"bdn.dev/accelerator": "L4"}),
    ({"accelerator": "H100:2", "cpu": "8", "memory": "64Gi"},
     {"cpu": "8000m", "memory": str(64 * 2**30), "nvidia.com/gpu": "2"},
     {"memory": str(64 * 2**30), "nvidia.com/gpu": "2"}, {"bdn.dev/accelerator": "H100"}),
    ({"cpu": "500m"}, {"cpu": "1000m", "memory": str(2 * 2**30)},
     {"memory": str(2 * 2**30)}, {}),
]


@pytest.mark.parametrize(("spec", "requests", "limits", "selector"), KUBE,
                         ids=[repr(v[0]) for v in KUBE])
def test_kubernetes_requests_follow_the_instance_type(
        spec: dict[str, Any], requests: dict[str, str], limits: dict[str, str],
        selector: dict[str, str]) -> None:
    req = parse_resources(spec)
    kube = kube_resources(choose_instance_type(req), req)
    assert kube.requests == requests
    assert kube.limits == limits
    assert kube.node_selector == selector
    # Quantities are strings: the Python client refuses integers.
    assert all(isinstance(v, str) for v in [*kube.requests.values(), *kube.limits.values()])
    assert bool(kube.tolerations) == ("nvidia.com/gpu" in requests)
