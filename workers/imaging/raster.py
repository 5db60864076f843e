"""Read a PNG or JPEG upload into a `Picture`.

EXIF orientation is applied first (a phone photo of a film is usually stored sideways). Grey modes scale by
their full scale: 255 for 8 bits, 65535 for 16-bit PNG (Pillow mode `I;16`, or `I` from older Pillow), not 255.
Colour reduces to BT.601 luma. Transparent pixels are composited over black, the colour of no exposure.
Pillow's traps: 16-bit RGB and 16-bit grey+alpha PNGs open as 8-bit `RGB` / `RGBA` (Pillow keeps the high
byte), and a palette image keeps its transparency only through `convert("RGBA")`.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image, ImageOps

from protocol.errors import UnsupportedMedia
from protocol.media import MediaKind, probe, third_party_boundary
from workers.imaging.present import Picture, luma, make_picture

__all__ = ["read_raster"]

_PILLOW_FORMATS = {MediaKind.PNG: "PNG", MediaKind.JPEG: "JPEG"}
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


def read_raster(data: bytes, *, max_image_pixels: int) -> Picture:
    """The upright grey picture of a PNG or JPEG upload (first frame of an APNG or MPO)."""
    info = probe(data, max_image_pixels=max_image_pixels)
    kind = MediaKind(info.format)
    if kind not in _PILLOW_FORMATS:
        raise UnsupportedMedia(f"expected a PNG or JPEG file, got {info.format}")
    with (
        third_party_boundary(f"{kind.value.upper()} image"),
        Image.open(BytesIO(data), formats=[_PILLOW_FORMATS[kind]]) as opened,
    ):
        upright = ImageOps.exif_transpose(opened)  # decodes; a copy when there is no orientation to apply
        grey = _grey(upright)
    return make_picture(grey, info)


def _grey(image: Image.Image) -> np.ndarray:
    """Float64 grey in [0, 1] for any Pillow mode."""
    if image.mode in _GREY_FULL_SCALE:
        return np.asarray(image, dtype=np.float64) / _GREY_FULL_SCALE[image.mode]
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
