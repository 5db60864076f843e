"""Fitting a presented picture to the model's height x width, as its registry entry says (`resize`):

    stretch      the whole picture, each axis scaled on its own (the aspect ratio is not kept)
    letterbox    the whole picture, scaled to fit inside, centred, the margins black (no exposure)
    center-crop  scaled to cover, the middle kept, the overhanging edges cut

Two steps, the way JPEG 2000 and JPEG decoders can shrink a picture themselves: first the picture is halved as
many times as it still covers the size the fit uses (`needed_size`), each output pixel the mean of a 2^n x 2^n
block (Pillow's `reduce`); then one resampling with Pillow's bilinear filter (it widens its support when
shrinking, so it anti-aliases, and has no negative lobes, so [0, 1] stays in [0, 1]). A decoder that hands over
a picture already halved n times (a JPEG 2000 resolution level, a JPEG decoded by DCT scaling) therefore gives
nearly the tensor of a full decode: the first step is what it has already done (docs/x-ray-input.md,
"Reduced-resolution decoding"). The block means also make the resampling cheap for a detector-sized film. A
frame presented through a table is halved as it is presented, a strip of rows at a time (`halve_in_strips`):
the same block means, bit for bit, without a full-size presented copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from inferq.protocol.registry import ImageInput

__all__ = ["align_wavelet_samples", "fit", "halve_in_strips", "halvings_before_fit", "needed_size", "reduction_levels"]

_RESAMPLE = Image.Resampling.BILINEAR
_MOST_HALVINGS = 12  # more than any image the size limit lets in needs
# Rows presented at once by `halve_in_strips`: about 2 MB of float32 for a detector-sized film, which stays in cache.
_STRIP_ROWS = 256


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


def halvings_before_fit(rows: int, columns: int, spec: ImageInput) -> int:
    """How many times a reader may halve a rows x columns picture (block means) and leave `fit` exactly the work
    it would do on the whole one: `fit`'s own first step, when that step stops short of its cap."""
    halvings = reduction_levels(rows, columns, spec, most=_MOST_HALVINGS)
    return halvings if halvings < _MOST_HALVINGS else 0


def halve_in_strips(
    shape: tuple[int, int], halvings: int, present_rows: Callable[[int, int, np.ndarray], None]
) -> np.ndarray:
    """The block means of a picture of `shape`, 2^halvings pixels a side (Pillow's `reduce`, as `fit` computes
    them), presented a strip of rows at a time: `present_rows(start, stop, out)` writes rows [start, stop) of the
    presented picture (float32, [0, 1]) into `out`. Each block lies within one strip, so the result is the whole
    picture's, bit for bit; but the presented picture is never held whole. For a 2500 x 2000 film that copy was
    20 MB written to memory and read back: presenting and halving it took 27 ms whole and 7.5 ms in strips."""
    rows, columns = shape
    block = 2**halvings
    step = max(block, _STRIP_ROWS // block * block)
    out = np.empty((min(step, rows), columns), dtype=np.float32)
    parts = []
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        strip = out[: stop - start]
        present_rows(start, stop, strip)
        parts.append(np.asarray(Image.fromarray(strip).reduce(block)))
    return np.concatenate(parts)


def fit(pixels: np.ndarray, spec: ImageInput) -> np.ndarray:
    """The picture (float32, [0, 1]) fitted to (spec.height, spec.width), as float64 in [0, 1]."""
    rows, columns = pixels.shape
    if (rows, columns) == (spec.height, spec.width):
        return pixels.astype(np.float64)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))  # 2-D float32 -> mode "F"
    halvings = reduction_levels(rows, columns, spec, most=_MOST_HALVINGS)
    if halvings:
        image = image.reduce(2**halvings)
    if spec.resize == "letterbox":
        fitted = _letterbox(image, spec)
    elif spec.resize == "center-crop":
        fitted = _center_crop(image, spec)
    else:
        fitted = np.asarray(image.resize((spec.width, spec.height), _RESAMPLE), dtype=np.float64)
    # Weights sum to one, but float rounding may step a hair outside [0, 1].
    return np.clip(fitted, 0.0, 1.0)


def align_wavelet_samples(pixels: np.ndarray, halvings: int) -> np.ndarray:
    """Move a JPEG 2000 resolution level onto the grid of block means (float64 out).

    The wavelet's low-pass filter is centred on the even samples (ISO 15444-1 F.3.8), so `halvings` levels down
    pixel n shows the picture around full-resolution pixel 2^halvings * n, where the mean of that block sits
    (2^halvings - 1) / 2 pixels further on: a shift by that much, linearly interpolated, the last row and column
    repeated. Without it a sharp edge lands 3.5 full-resolution pixels off at three levels down."""
    shift = (2**halvings - 1) / 2 ** (halvings + 1)
    moved = pixels.astype(np.float64)
    for axis in (0, 1):
        following = np.concatenate([np.delete(moved, 0, axis=axis), np.take(moved, [-1], axis=axis)], axis=axis)
        moved = (1.0 - shift) * moved + shift * following
    return moved


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
