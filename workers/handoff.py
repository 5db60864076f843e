"""The decoded input handed from a separate decoding stage to the model's stage: a float32 array and what may be
said of the image, as one blob. No pickle: a JSON header line, then the array's raw little-endian bytes."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import numpy as np

from inferq.protocol.errors import InvalidRequest
from inferq.protocol.media import ImageInfo

_IMAGE_INFO_FIELDS = {f.name for f in fields(ImageInfo)}


def pack(rows: np.ndarray, info: ImageInfo | None) -> bytes:
    array = np.ascontiguousarray(rows, dtype="<f4")
    header = {"shape": list(array.shape), "info": info.to_dict() if info is not None else None}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + array.tobytes()


def unpack(blob: bytes) -> tuple[np.ndarray, ImageInfo | None]:
    line, _, data = blob.partition(b"\n")
    try:
        header = json.loads(line)
        rows = np.frombuffer(data, dtype="<f4").reshape(header["shape"]).astype(np.float32)
        described = header["info"]
        info = None if described is None else ImageInfo(**_image_info_fields(described))
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidRequest("the decoded input handed to the model's stage is damaged") from e
    return rows, info


def _image_info_fields(described: dict[str, Any]) -> dict[str, Any]:
    known = {k: v for k, v in described.items() if k in _IMAGE_INFO_FIELDS}
    known["views"] = tuple(known.get("views") or ())
    return known
