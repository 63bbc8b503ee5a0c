"""``NumpyArrayField``: numpy arrays in pydantic models that cross chainlet boundaries.

As documented: in JSON an array is ``{"shape", "dtype", "data_b64"}`` (base64 of
``ndarray.tobytes()``); in Python mode (what msgpack carries between chainlets with
``use_binary=True``) ``data`` is raw bytes, so binary calls pay no base64.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pydantic
from pydantic_core import core_schema


class NumpyArrayField:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __repr__(self) -> str:
        return (f"NumpyArrayField(shape={self.array.shape}, dtype={self.array.dtype}, "
                f"data={self.array})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NumpyArrayField) and np.array_equal(self.array, other.array)

    @classmethod
    def _validate(cls, value: Any) -> NumpyArrayField:
        if isinstance(value, NumpyArrayField):
            return value
        if isinstance(value, np.ndarray):
            return cls(value)
        if isinstance(value, dict) and "shape" in value and "dtype" in value:
            if "data" in value:
                raw = value["data"]
            elif "data_b64" in value:
                raw = base64.b64decode(value["data_b64"])
            else:
                raise ValueError("an array needs 'data' (bytes) or 'data_b64'")
            dtype = np.dtype(value["dtype"])
            shape = tuple(int(n) for n in value["shape"])
            if len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"{len(raw)} bytes do not make an array of shape {shape} "
                                 f"and dtype {dtype}")
            return cls(np.frombuffer(raw, dtype=dtype).reshape(shape).copy())
        raise ValueError(f"expected a numpy array or its dict form, got {type(value).__name__}")

    def _serialize(self, info: core_schema.SerializationInfo) -> dict[str, Any]:
        a = np.ascontiguousarray(self.array)
        doc: dict[str, Any] = {"shape": list(a.shape), "dtype": a.dtype.str}
        if info.mode == "json":
            doc["data_b64"] = base64.b64encode(a.tobytes()).decode()
        else:
            doc["data"] = a.tobytes()
        return doc

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any,
                                     handler: pydantic.GetCoreSchemaHandler
                                     ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda v, info: v._serialize(info), info_arg=True))
