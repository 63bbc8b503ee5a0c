"""How each safetensors dtype becomes a torch tensor.

Every dtype the format defines loads. Most map one to one onto a torch dtype. Two cases
do not:

* ``F4`` (FP4 E2M1) is packed two values per byte. Torch's ``float4_e2m1fn_x2`` holds a
  *pair* per element, so a tensor of shape ``(..., n)`` loads as ``(..., n // 2)`` of
  that dtype, exactly as ``safetensors.torch`` does. When the last dimension is odd the
  pairs straddle rows; such a tensor loads as its raw bytes.
* ``F6_E2M3`` / ``F6_E3M2`` have no torch dtype (and ``safetensors.torch`` refuses
  them). They load as their raw bytes.

"Raw bytes" means a 1-D ``torch.uint8`` tensor of the tensor's byte length; the
caller unpacks it with the dtype and shape from the header (see :func:`torch_layout`).
A torch build without some dtype (older than the pinned one) falls back the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from manifests.safetensors import TensorInfo


def _maybe(name: str) -> torch.dtype | None:
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


# None: no torch dtype; the tensor loads as raw uint8 bytes.
TORCH_DTYPES: dict[str, torch.dtype | None] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": _maybe("uint16"),
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": _maybe("uint32"),
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": _maybe("uint64"),
    "F8_E5M2": _maybe("float8_e5m2"),
    "F8_E4M3": _maybe("float8_e4m3fn"),
    "F8_E8M0": _maybe("float8_e8m0fnu"),
    # Defined by safetensors >= 0.6; accepted here if the header parser knows them.
    "F8_E4M3FNUZ": _maybe("float8_e4m3fnuz"),
    "F8_E5M2FNUZ": _maybe("float8_e5m2fnuz"),
    "F4": _maybe("float4_e2m1fn_x2"),
    "F6_E2M3": None,
    "F6_E3M2": None,
}


@dataclass(frozen=True, slots=True)
class TorchLayout:
    """What a header entry becomes: ``dtype`` and ``shape`` of the loaded tensor.

    ``raw`` is true when the tensor is delivered as its bytes (``uint8``, 1-D).
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    raw: bool

    @property
    def itemsize(self) -> int:
        return 1 if self.raw else self.dtype.itemsize


def torch_layout(info: TensorInfo) -> TorchLayout:
    """The torch dtype and shape a header entry loads as (see the module docstring)."""
    dtype = TORCH_DTYPES.get(info.dtype)
    if dtype is None:
        return TorchLayout(torch.uint8, (info.nbytes,), raw=True)
    if info.dtype == "F4":
        if not info.shape or info.shape[-1] % 2:
            return TorchLayout(torch.uint8, (info.nbytes,), raw=True)
        return TorchLayout(dtype, (*info.shape[:-1], info.shape[-1] // 2), raw=False)
    return TorchLayout(dtype, info.shape, raw=False)
