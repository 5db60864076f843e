"""Tensors in the Open Inference Protocol (KServe v2) JSON form, and the checks against a model's spec.

{"name": "transactions", "shape": [2, 30], "datatype": "FP32", "data": [...60 numbers, flat or nested...]}
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.numpy import load, save

from inferq.protocol.errors import InvalidTensor
from inferq.protocol.registry import TensorInput

_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}
_DATATYPES = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}


class TensorPayload(BaseModel):
    """One input or output tensor."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    shape: list[int]
    datatype: str
    data: list[Any]


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def _check_shape(shape: list[int], spec: TensorInput) -> None:
    if len(shape) != len(spec.shape) or any(
        want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
    ):
        raise InvalidTensor(f"input {spec.name!r} must have shape {list(spec.shape)} (-1: any), got {shape}")
    if any(d <= 0 for d in shape):
        raise InvalidTensor(f"input {spec.name!r} has an empty or negative dimension: {shape}")


def decode_tensor(payload: TensorPayload, spec: TensorInput) -> np.ndarray:
    """The payload as an array of the spec's dtype, or `InvalidTensor` saying exactly what is wrong."""
    if payload.name != spec.name:
        raise InvalidTensor(f"the model's input is named {spec.name!r}, got {payload.name!r}")
    if payload.datatype != spec.datatype:
        raise InvalidTensor(f"input {spec.name!r} must be {spec.datatype}, got {payload.datatype!r}")
    _check_shape(payload.shape, spec)
    expected = math.prod(payload.shape)
    dtype = np.dtype(_NUMPY_DTYPES[spec.datatype])
    array = _fast_array(payload, expected, dtype, spec)
    if array is None:  # ragged nesting, non-numbers or huge integers: the exact, slower checks
        flat = _flatten(payload.data)
        if len(flat) != expected:
            raise InvalidTensor(f"shape {payload.shape} needs {expected} values, got {len(flat)}")
        if not all(isinstance(v, int | float) for v in flat):
            raise InvalidTensor(f"input {spec.name!r} must hold numbers only")
        try:
            array = np.asarray(flat, dtype=dtype)
        except (ValueError, OverflowError) as e:
            raise InvalidTensor(f"input {spec.name!r} has values that do not fit {spec.datatype}") from e
    array = array.reshape(payload.shape)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidTensor(f"input {spec.name!r} holds NaN or infinity")
    return array


def _fast_array(payload: TensorPayload, expected: int, dtype: np.dtype[Any], spec: TensorInput) -> np.ndarray | None:
    """numpy's own reading of a regular list of numbers (most requests), without a Python loop per value; None
    where that cannot decide."""
    try:
        raw = np.asarray(payload.data)
    except (ValueError, OverflowError):
        return None
    if raw.dtype.kind not in "biuf":
        return None
    if raw.size != expected:
        raise InvalidTensor(f"shape {payload.shape} needs {expected} values, got {raw.size}")
    if dtype.kind in "iu" and raw.size and raw.dtype.kind in "iuf":
        limits = np.iinfo(dtype)
        if raw.min() < limits.min or raw.max() > limits.max:
            raise InvalidTensor(f"input {spec.name!r} has values that do not fit {spec.datatype}")
    with np.errstate(over="ignore", invalid="ignore"):
        return raw.astype(dtype).reshape(-1)


def select_input(inputs: list[TensorPayload], spec: TensorInput) -> TensorPayload:
    """The one input the model takes; a request with several inputs must name the model's."""
    if len(inputs) == 1:
        return inputs[0]
    named = [t for t in inputs if t.name == spec.name]
    if len(named) != 1:
        raise InvalidTensor(f"the model takes one input named {spec.name!r}; got {[t.name for t in inputs]}")
    return named[0]


def encode_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    """An output tensor in the protocol's form, data flat in row-major order."""
    datatype = _DATATYPES.get(array.dtype)
    if datatype is None:
        raise InvalidTensor(f"no protocol datatype for {array.dtype}")
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.reshape(-1).tolist()}


def tensor_to_bytes(array: np.ndarray, name: str) -> bytes:
    """The stored form of a validated tensor input (the job's blob): safetensors, as the weights are, which a
    worker maps back without parsing numbers (and which holds no code: no pickle)."""
    return save({name: np.ascontiguousarray(array)})


def tensor_from_bytes(blob: bytes, spec: TensorInput) -> np.ndarray:
    if blob.startswith(b"{"):  # the protocol JSON that earlier versions stored
        try:
            payload = TensorPayload.model_validate_json(blob)
        except ValueError as e:
            raise InvalidTensor("the stored tensor is not valid protocol JSON") from e
        return decode_tensor(payload, spec)
    try:
        array = load(blob).get(spec.name)
    except SafetensorError as e:
        raise InvalidTensor("the stored tensor is not a valid safetensors file") from e
    if array is None:
        raise InvalidTensor(f"the stored tensor holds no input named {spec.name!r}")
    if array.dtype != np.dtype(_NUMPY_DTYPES[spec.datatype]):
        raise InvalidTensor(f"the stored tensor is {array.dtype}, the model takes {spec.datatype}")
    _check_shape(list(array.shape), spec)
    return array
