"""Open Inference Protocol tensors: decoding checks every way a request can be wrong."""

from __future__ import annotations

import numpy as np
import pytest

from inferq.protocol.codec import (
    TensorPayload,
    decode_tensor,
    encode_tensor,
    select_input,
    tensor_from_bytes,
    tensor_to_bytes,
)
from inferq.protocol.errors import InvalidTensor
from inferq.protocol.registry import TensorInput

SPEC = TensorInput(name="transactions", shape=(-1, 3), datatype="FP32")


def _payload(**changes: object) -> TensorPayload:
    fields: dict[str, object] = {
        "name": "transactions",
        "shape": [2, 3],
        "datatype": "FP32",
        "data": [1, 2, 3, 4, 5, 6],
    }
    return TensorPayload.model_validate({**fields, **changes})


def test_flat_and_nested_data_decode_to_the_same_array() -> None:
    flat = decode_tensor(_payload(), SPEC)
    nested = decode_tensor(_payload(data=[[1, 2, 3], [4, 5, 6]]), SPEC)
    assert flat.dtype == np.float32 and flat.shape == (2, 3)
    np.testing.assert_array_equal(flat, nested)
    np.testing.assert_array_equal(flat[1], [4, 5, 6])


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"name": "other"}, "named"),
        ({"datatype": "INT64"}, "must be FP32"),
        ({"shape": [2, 4], "data": list(range(8))}, "shape"),
        ({"shape": [6]}, "shape"),
        ({"data": [1, 2, 3]}, "needs 6 values"),
        ({"data": [1, 2, 3, 4, 5, "x"]}, "numbers"),
        ({"data": [1, 2, 3, 4, 5, float("nan")]}, "NaN"),
        ({"shape": [0, 3], "data": []}, "empty"),
    ],
)
def test_bad_tensors_are_refused_with_the_reason(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidTensor, match=fragment):
        decode_tensor(_payload(**changes), SPEC)


def test_the_stored_form_round_trips() -> None:
    array = decode_tensor(_payload(), SPEC)
    np.testing.assert_array_equal(tensor_from_bytes(tensor_to_bytes(array, "transactions"), SPEC), array)


def test_outputs_are_encoded_row_major() -> None:
    encoded = encode_tensor("p", np.array([[0.25], [0.5]], dtype=np.float32))
    assert encoded == {"name": "p", "shape": [2, 1], "datatype": "FP32", "data": [0.25, 0.5]}


def test_several_inputs_must_name_the_models_own() -> None:
    other = _payload(name="extra")
    assert select_input([other, _payload()], SPEC).name == "transactions"
    with pytest.raises(InvalidTensor):
        select_input([other, other], SPEC)
