"""Fitting a presented picture to the model's height x width, as its registry entry says (`resize`):

    stretch      the whole picture, each axis scaled on its own (the aspect ratio is not kept)
    letterbox    the whole picture, scaled to fit inside, centred, the margins black (no exposure)
    center-crop  scaled to cover, the middle kept, the overhanging edges cut

One resampling step, with Pillow's bilinear filter (it widens its support when shrinking, so it anti-aliases,
and has no negative lobes, so [0, 1] stays in [0, 1]). `needed_size` tells the decoders how small a picture
may be decoded and still cover what the fit will use (docs/x-ray-input.md, "Reduced-resolution decoding").
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from protocol.registry import ImageInput

__all__ = ["fit", "needed_size", "reduction_levels"]

_RESAMPLE = Image.Resampling.BILINEAR


def needed_size(rows: int, columns: int, spec: ImageInput) -> tuple[int, int]:
    """(height, width) in pixels that the whole picture is scaled to before padding or cropping, rounded up."""
    if spec.resize == "stretch":
        return spec.height, spec.width
    scale = _scale(rows, columns, spec)
    return math.ceil(rows * scale), math.ceil(columns * scale)


def reduction_levels(rows: int, columns: int, spec: ImageInput, *, most: int) -> int:
    """The most halvings (at most `most`) after which a rows x columns picture still covers `needed_size`."""
    need_rows, need_columns = needed_size(rows, columns, spec)
    levels = 0
    while (
        levels < most
        and math.ceil(rows / 2 ** (levels + 1)) >= need_rows
        and math.ceil(columns / 2 ** (levels + 1)) >= need_columns
    ):
        levels += 1
    return levels


def fit(pixels: np.ndarray, spec: ImageInput) -> np.ndarray:
    """The picture (float32, [0, 1]) fitted to (spec.height, spec.width), as float64 in [0, 1]."""
    rows, columns = pixels.shape
    if (rows, columns) == (spec.height, spec.width):
        return pixels.astype(np.float64)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))  # 2-D float32 -> mode "F"
    if spec.resize == "letterbox":
        fitted = _letterbox(image, spec)
    elif spec.resize == "center-crop":
        fitted = _center_crop(image, spec)
    else:
        fitted = np.asarray(image.resize((spec.width, spec.height), _RESAMPLE), dtype=np.float64)
    # Weights sum to one, but float rounding may step a hair outside [0, 1].
    return np.clip(fitted, 0.0, 1.0)


def _scale(rows: int, columns: int, spec: ImageInput) -> float:
    scales = (spec.height / rows, spec.width / columns)
    return min(scales) if spec.resize == "letterbox" else max(scales)


def _letterbox(image: Image.Image, spec: ImageInput) -> np.ndarray:
    columns, rows = image.size
    scale = _scale(rows, columns, spec)
    inner_rows = min(spec.height, max(1, round(rows * scale)))
    inner_columns = min(spec.width, max(1, round(columns * scale)))
    inner = np.asarray(image.resize((inner_columns, inner_rows), _RESAMPLE), dtype=np.float64)
    canvas = np.zeros((spec.height, spec.width), dtype=np.float64)
    top, left = (spec.height - inner_rows) // 2, (spec.width - inner_columns) // 2
    canvas[top : top + inner_rows, left : left + inner_columns] = inner
    return canvas


def _center_crop(image: Image.Image, spec: ImageInput) -> np.ndarray:
    """Resample only the middle region straight to the output size: one filter pass, no intermediate image."""
    columns, rows = image.size
    scale = _scale(rows, columns, spec)
    box_columns, box_rows = spec.width / scale, spec.height / scale
    left, top = (columns - box_columns) / 2, (rows - box_rows) / 2
    box = (left, top, left + box_columns, top + box_rows)
    return np.asarray(image.resize((spec.width, spec.height), _RESAMPLE, box=box), dtype=np.float64)
