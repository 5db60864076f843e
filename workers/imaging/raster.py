"""Read a PNG or JPEG upload into a `Picture` (docs/x-ray-input.md).

EXIF orientation is applied first (a phone photo of a film is usually stored sideways). Grey modes scale by
their full scale: 255 for 8 bits, 65535 for 16-bit PNG (Pillow mode `I;16`, or `I` from older Pillow), not 255,
except where an `sBIT` chunk says fewer bits are significant and no sample uses the bits above them: then the
exporter wrote the detector's values unscaled (12-bit data in a 16-bit PNG) and the full scale is
2^sBIT - 1; samples scaled up as the PNG specification asks (11.3.3.4) keep 65535. Colour reduces to BT.601
luma. Transparent pixels are composited over black, the colour of no exposure. Pillow's traps: 16-bit RGB and
16-bit grey+alpha PNGs open as 8-bit `RGB` / `RGBA` (Pillow keeps the high byte), and a palette image keeps
its transparency only through `convert("RGBA")`.

With a model's input spec, a baseline JPEG much larger than the model needs is decoded by DCT scaling
(Pillow's `draft`: 1/2, 1/4 or 1/8, never below what the fit will use).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from inferq.protocol.media import ImageInfo, check_fits, open_raster, third_party_boundary
from inferq.protocol.registry import ImageInput
from inferq.workers.imaging.geometry import halvings_before_fit, needed_size
from inferq.workers.imaging.present import Picture, luma, make_picture, present_through_table

__all__ = ["read_raster"]

# The value that means white in each single-channel Pillow mode.
_GREY_FULL_SCALE = {
    "1": 1.0,
    "L": 255.0,
    "I;16": 65535.0,
    "I;16L": 65535.0,
    "I;16B": 65535.0,
    "I;16N": 65535.0,
    "I": 65535.0,  # only a 16-bit PNG opens as 32-bit "I"
    "F": 1.0,
}
_CONTAINER_BITS = {"L": 8, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 16}
# Grey modes of 8 or 16-bit integers, presented through a table of every stored value.
_TABLE_MODES = ("L", "I;16", "I;16L", "I;16B", "I;16N")


def read_raster(data: bytes, *, max_image_pixels: int, spec: ImageInput | None = None) -> Picture:
    """The upright grey picture of a PNG or JPEG upload (first frame of an APNG or MPO)."""
    info, opened = open_raster(data, max_image_pixels=max_image_pixels)
    with third_party_boundary(f"{info.format.upper()} image"), opened:
        if spec is not None:
            check_fits(info, spec)
            _draft(opened, info, spec)
        opened.load()
        # In place: a copy of a detector-sized picture costs as much as presenting it.
        ImageOps.exif_transpose(opened, in_place=True)
        upright = opened
        if upright.mode in _TABLE_MODES:
            halvings = halvings_before_fit(upright.height, upright.width, spec) if spec is not None else 0
            return make_picture(_grey_through_table(upright, info, halvings), info, checked=True)
        grey = _grey(upright, info)
    return make_picture(grey, info)


def _draft(image: Image.Image, info: ImageInfo, spec: ImageInput) -> None:
    """Ask a JPEG for a DCT-scaled decode of at least the size the fit uses (a no-op for PNG)."""
    if info.format != "jpeg":
        return
    rows, columns = needed_size(info.rows, info.columns, spec)
    orientation = image.getexif().get(0x0112, 1)
    if orientation in (5, 6, 7, 8):  # stored sideways: the fit's rows are the stored columns
        rows, columns = columns, rows
    image.draft(image.mode, (columns, rows))


def _grey_through_table(image: Image.Image, info: ImageInfo, halvings: int) -> np.ndarray:
    """An 8 or 16-bit grey picture, float32 in [0, 1], through a table of every stored value's grey (what `_grey`
    computes for each pixel, bit for bit), halved `halvings` times as it is presented: a detector-sized PNG is
    never held whole as float."""
    values = np.asarray(image)
    values = values.astype(np.uint8 if values.dtype.itemsize == 1 else np.uint16, copy=False)  # native order
    full_scale = _grey_full_scale(values, image.mode, info)
    entries = np.arange(1 << (8 * values.dtype.itemsize), dtype=np.float64)
    table = np.clip(entries / full_scale, 0.0, 1.0).astype(np.float32)
    return present_through_table(table, values, halvings)


def _grey(image: Image.Image, info: ImageInfo | None = None) -> np.ndarray:
    """Float64 grey in [0, 1] for any Pillow mode."""
    if image.mode in _GREY_FULL_SCALE:
        values = np.asarray(image, dtype=np.float64)
        return values / _grey_full_scale(values, image.mode, info)
    if image.mode == "LA":
        grey_alpha = np.asarray(image, dtype=np.float64) / 255.0
        return grey_alpha[..., 0] * grey_alpha[..., 1]
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # keeps a palette's transparency
    elif image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    colour = np.asarray(image, dtype=np.float64) / 255.0
    grey = luma(colour)
    return grey * colour[..., 3] if image.mode == "RGBA" else grey


def _grey_full_scale(values: np.ndarray, mode: str, info: ImageInfo | None) -> float:
    """2^sBIT - 1 for unscaled significant bits (nothing above them is set), else the mode's full scale."""
    container_bits = _CONTAINER_BITS.get(mode)
    significant = info.bits_stored if info is not None and info.format == "png" else None
    if container_bits is None or significant is None or significant >= container_bits:
        return _GREY_FULL_SCALE[mode]
    full_scale = float((1 << significant) - 1)
    return full_scale if values.max() <= full_scale else _GREY_FULL_SCALE[mode]
