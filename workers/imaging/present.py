"""The presented picture, and how it becomes a model's input tensor.

A `Picture` is what a viewer would show: one grey channel, float32, values in [0, 1], 0 = black. The readers
(`dicom`, `raster`) make one; `to_model_input` fits it to the model's height and width as its registry entry
says (`geometry`: stretch, letterbox or center-crop, with an anti-aliasing filter), replicates it to the model's
channels, then applies the model's own normalisation. Everything here is plain numpy and Pillow, so the same
bytes give bit-identical tensors. The whole order of operations is in docs/x-ray-input.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inferq.protocol.errors import InvalidImage
from inferq.protocol.media import ImageInfo
from inferq.protocol.registry import ImageInput
from inferq.workers.imaging.geometry import fit, halve_in_strips

__all__ = ["BT601_LUMA", "Picture", "luma", "make_picture", "present_through_table", "to_model_input"]

# ITU-R BT.601 luma weights for R, G, B: the grey a colour picture reduces to.
BT601_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Picture:
    """A picture as a viewer shows it: `pixels` float32 (height, width) in [0, 1], 0 = black; read-only."""

    pixels: np.ndarray
    info: ImageInfo

    def __post_init__(self) -> None:
        if self.pixels.ndim != 2 or self.pixels.dtype != np.float32:
            raise ValueError(f"a Picture needs 2-D float32 pixels, got {self.pixels.dtype} {self.pixels.shape}")


def make_picture(grey: np.ndarray, info: ImageInfo, *, checked: bool = False) -> Picture:
    """Freeze a presented grey array (any float dtype, nominally [0, 1]) into a read-only float32 `Picture`;
    `checked` says it is float32, finite and in [0, 1] already (a presentation table was), saving two passes."""
    if checked and grey.dtype == np.float32:
        pixels = np.ascontiguousarray(grey)
    else:
        if not np.all(np.isfinite(grey)):
            raise InvalidImage("the image presents non-finite values")
        pixels = np.ascontiguousarray(np.clip(grey, 0.0, 1.0), dtype=np.float32)
    pixels.flags.writeable = False
    return Picture(pixels=pixels, info=info)


def present_through_table(table: np.ndarray, indices: np.ndarray, halvings: int) -> np.ndarray:
    """`table[indices]` for a table of float32 values in [0, 1], one entry per stored value; halved `halvings`
    times as the fit's first step would halve it (block means), presented a strip at a time so that a
    detector-sized picture is never held whole (`geometry.halve_in_strips`). Block means of values in [0, 1] stay
    in [0, 1]: the result is as checked as the table."""
    if halvings == 0 or indices.ndim != 2:
        return np.take(table, indices)  # take: about twice as fast as fancy indexing here

    def present_rows(start: int, stop: int, out: np.ndarray) -> None:
        np.take(table, indices[start:stop], out=out)

    return halve_in_strips(indices.shape, halvings, present_rows)


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of the first three channels of (..., 3 or 4), in the input's scale, as float64."""
    red, green, blue = (rgb[..., channel].astype(np.float64) for channel in range(3))
    return red * BT601_LUMA[0] + green * BT601_LUMA[1] + blue * BT601_LUMA[2]


def to_model_input(picture: Picture, spec: ImageInput) -> np.ndarray:
    """The model's float32 input (channels, height, width): fitted, replicated, then (x - mean) / std."""
    resized = fit(picture.pixels, spec)
    mean = np.asarray(spec.mean, dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float64).reshape(-1, 1, 1)
    channels = np.broadcast_to(resized, (spec.channels, spec.height, spec.width))
    return np.ascontiguousarray((channels - mean) / std, dtype=np.float32)
