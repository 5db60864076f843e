"""Compressed frames read from their own headers, and decoded at a reduced resolution where the format allows.

    codestream_size(frame)              (height, width) a JPEG / JPEG-LS / JPEG 2000 frame declares, or None
    j2k_header(frame)                   a JPEG 2000 codestream's size, first component and decomposition levels
    decode_j2k(frame, levels)           the image `levels` halvings down, from the wavelet's own low-pass band
    decode_jpeg_scaled(frame, size)     a baseline JPEG decoded by DCT scaling (1/2, 1/4, 1/8) to at least `size`

A JPEG 2000 codestream holds its picture at every power-of-two resolution: the resolution level `r` is the
low-pass band of the wavelet after `r` decompositions, a properly filtered smaller picture that is decoded
without touching the finer bands (ISO 15444-1 B.5; OpenJPEG's `cp_reduce`, Pillow's `Jpeg2KImageFile.reduce`).
pylibjpeg-openjpeg, which pydicom uses, has no such option, so the reduced frame is decoded by Pillow's
OpenJPEG binding. A baseline JPEG can be decoded with a 4x4, 2x2 or 1x1 inverse DCT per 8x8 block (libjpeg's
`scale_num / scale_denom`, Pillow's `draft`). Both give stored values, ready for the modality and VOI steps.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

import numpy as np
from PIL import Image

__all__ = [
    "JPEG_BASELINE_SOF",
    "J2kHeader",
    "codestream_size",
    "decode_j2k",
    "decode_jpeg_scaled",
    "j2k_header",
    "jpeg_precision",
]

_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ: the start of a JPEG 2000 codestream
_J2K_SEARCH_BYTES = 65536  # a JP2 header may wrap the codestream
_J2K_COD = 0xFF52
_J2K_SOT = 0xFF90  # the first tile-part: the main header is over
# JPEG frame headers (SOFn, less DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55.
_JPEG_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
JPEG_BASELINE_SOF = 0xC0  # SOF0: baseline DCT, 8-bit, Huffman
_PILLOW_CONTAINER_BITS = {"L": 8, "I;16": 16}


@dataclass(frozen=True)
class J2kHeader:
    """What a JPEG 2000 main header says: image size, components, the first one's depth, decomposition levels."""

    height: int
    width: int
    components: int
    precision: int
    signed: bool
    levels: int


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG 2000 SIZ or a JPEG / JPEG-LS frame header; None when neither is found."""
    start = frame.find(_J2K_SOC_SIZ, 0, _J2K_SEARCH_BYTES)
    if start >= 0 and start + 24 <= len(frame):
        # SOC (2), SIZ (2), Lsiz (2), Rsiz (2), then Xsiz, Ysiz, XOsiz, YOsiz (4 each)
        x_size, y_size, x_offset, y_offset = struct.unpack_from(">4I", frame, start + 8)
        return y_size - y_offset, x_size - x_offset
    sof = _jpeg_frame_header(frame)
    return None if sof is None else (sof[2], sof[3])


def j2k_header(frame: bytes) -> J2kHeader | None:
    """The main header of a raw JPEG 2000 codestream (not a JP2 file); None when it is not one or is damaged."""
    if not frame.startswith(_J2K_SOC_SIZ) or len(frame) < 42:
        return None
    # SIZ after SOC: Lsiz (2) Rsiz (2) Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz (4 each) Csiz (2), then
    # per component Ssiz (1) XRsiz (1) YRsiz (1).
    siz_length = struct.unpack_from(">H", frame, 4)[0]
    x_size, y_size, x_offset, y_offset = struct.unpack_from(">4I", frame, 8)
    components = struct.unpack_from(">H", frame, 40)[0]
    depth = frame[42] if len(frame) > 42 else 0
    levels = _j2k_decomposition_levels(frame, 4 + siz_length)
    if levels is None:
        return None
    return J2kHeader(
        height=y_size - y_offset,
        width=x_size - x_offset,
        components=components,
        precision=(depth & 0x7F) + 1,
        signed=bool(depth & 0x80),
        levels=levels,
    )


def _j2k_decomposition_levels(frame: bytes, offset: int) -> int | None:
    """Walk the main header's marker segments to COD: Scod (1), SGcod (4), then SPcod's decomposition levels.

    A COC segment may give one component fewer levels; the readers here only reduce single-component images,
    whose COC (if any) overrides COD, so the smaller of the two is used."""
    levels: int | None = None
    while offset + 4 <= len(frame):
        marker, length = struct.unpack_from(">HH", frame, offset)
        if marker == _J2K_SOT or marker >> 8 != 0xFF:
            break
        if marker == _J2K_COD and offset + 9 < len(frame):
            levels = frame[offset + 9] if levels is None else min(levels, frame[offset + 9])
        elif marker == 0xFF53 and offset + 7 < len(frame):  # COC: Lcoc, Ccoc (1 byte for < 257 components), Scoc
            levels = frame[offset + 6] if levels is None else min(levels, frame[offset + 6])
        offset += 2 + length
    return levels


def decode_j2k(frame: bytes, header: J2kHeader, levels: int) -> np.ndarray:
    """The frame's single unsigned component, `levels` resolution levels down, as the stored values (uint16)."""
    with Image.open(BytesIO(frame), formats=["JPEG2000"]) as image:
        # Jpeg2KImageFile's `reduce` property (which shadows Image.reduce): resolution levels to discard.
        cast(Any, image).reduce = levels
        image.load()
        container_bits = _PILLOW_CONTAINER_BITS[image.mode]
        values = np.asarray(image).astype(np.uint16)
    # Pillow scales every sample up to its container (a 12-bit sample is shifted left by 4): undo it.
    return np.right_shift(values, container_bits - header.precision)


def jpeg_precision(frame: bytes) -> tuple[int, int] | None:
    """(SOF marker, sample precision) of a JPEG frame, or None."""
    sof = _jpeg_frame_header(frame)
    return None if sof is None else (sof[0], sof[1])


def decode_jpeg_scaled(frame: bytes, size: tuple[int, int]) -> np.ndarray:
    """A single-component 8-bit JPEG decoded by DCT scaling to the smallest scale of at least (height, width)."""
    with Image.open(BytesIO(frame), formats=["JPEG"]) as image:
        image.draft(image.mode, (size[1], size[0]))
        return np.asarray(image.convert("L") if image.mode != "L" else image)


def _jpeg_frame_header(frame: bytes) -> tuple[int, int, int, int] | None:
    """(SOF marker, precision, height, width) from the first frame header of a JPEG or JPEG-LS stream."""
    if not frame.startswith(b"\xff\xd8"):
        return None
    offset = 2  # after SOI
    while offset + 4 <= len(frame):
        if frame[offset] != 0xFF:
            return None
        marker = frame[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in _JPEG_SOF_MARKERS and offset + 9 <= len(frame):
            precision = frame[offset + 4]  # after the marker (2) and its length (2)
            height, width = struct.unpack_from(">HH", frame, offset + 5)
            return marker, precision, height, width
        offset += 2 + int.from_bytes(frame[offset + 2 : offset + 4], "big")
    return None
