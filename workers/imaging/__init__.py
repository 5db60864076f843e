"""Uploaded images to model tensors, without torch: read (DICOM, PNG, JPEG), present, fit, normalise.

    read_picture(data)            -> Picture   what a viewer shows: float32 (H, W) in [0, 1], 0 = black
    to_model_input(picture, spec) -> float32 (channels, height, width), fitted and normalised as the model says
    preprocess(data, spec)        -> both, plus the ImageInfo a result may repeat

`preprocess` also refuses what the model was not made for (view, body part) and decodes no finer than the
model needs (JPEG 2000 resolution levels, JPEG DCT scaling); `read_picture` without a spec decodes whole.
The same bytes always give bit-identical arrays. Failures are `InvalidImage` (or a subclass) or
`UnsupportedMedia`, never a raw pydicom or Pillow exception. The order of operations, each quirk handled and
each refusal code: docs/x-ray-input.md.
"""

from __future__ import annotations

import numpy as np

from inferq.protocol.media import ImageInfo, MediaKind, sniff
from inferq.protocol.registry import ImageInput
from inferq.workers.imaging.dicom import read_dicom
from inferq.workers.imaging.present import BT601_LUMA, Picture, to_model_input
from inferq.workers.imaging.raster import read_raster

__all__ = ["BT601_LUMA", "Picture", "preprocess", "read_picture", "to_model_input"]


def read_picture(data: bytes, *, max_image_pixels: int, spec: ImageInput | None = None) -> Picture:
    """Sniff, check the header and size limit, decode and present the upload.

    With `spec`, the image must fit the model (`unsupported_view` otherwise) and is decoded at the smallest
    resolution that still covers the model's input where its encoding allows."""
    if sniff(data) is MediaKind.DICOM:
        return read_dicom(data, max_image_pixels=max_image_pixels, spec=spec)
    return read_raster(data, max_image_pixels=max_image_pixels, spec=spec)


def preprocess(data: bytes, spec: ImageInput, *, max_image_pixels: int) -> tuple[np.ndarray, ImageInfo]:
    """The model's input tensor for an upload, and what may be said about the image."""
    picture = read_picture(data, max_image_pixels=max_image_pixels, spec=spec)
    return to_model_input(picture, spec), picture.info
