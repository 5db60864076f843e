"""workers.imaging.present: a Picture to a model's input tensor (resize with anti-aliasing, then normalise)."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from inferq.protocol.errors import InvalidImage
from inferq.protocol.media import ImageInfo
from inferq.protocol.registry import ImageInput
from inferq.workers.imaging import BT601_LUMA, Picture, preprocess, to_model_input
from inferq.workers.imaging.present import make_picture

MAX_PIXELS = 40_000_000
IMAGENET = ImageInput(height=32, width=48, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _picture(pixels: np.ndarray) -> Picture:
    info = ImageInfo("png", pixels.shape[0], pixels.shape[1], 1, 8, None, "MONOCHROME2", None, None)
    return make_picture(pixels, info)


def test_tensor_has_the_model_shape_dtype_and_layout() -> None:
    tensor = to_model_input(_picture(np.full((100, 70), 0.5)), IMAGENET)
    assert tensor.shape == (3, 32, 48)
    assert tensor.dtype == np.float32
    assert tensor.flags.c_contiguous


def test_each_channel_gets_its_own_mean_and_std() -> None:
    tensor = to_model_input(_picture(np.full((64, 64), 0.5)), IMAGENET)
    for channel, (mean, std) in enumerate(zip(IMAGENET.mean, IMAGENET.std, strict=True)):
        np.testing.assert_allclose(tensor[channel], (0.5 - mean) / std, rtol=1e-6)


def test_grey_channel_is_replicated_before_normalising() -> None:
    ramp = np.linspace(0, 1, 32 * 48).reshape(32, 48)
    tensor = to_model_input(_picture(ramp), IMAGENET)
    recovered = tensor * np.asarray(IMAGENET.std)[:, None, None] + np.asarray(IMAGENET.mean)[:, None, None]
    np.testing.assert_allclose(recovered[0], recovered[1], atol=1e-6)
    np.testing.assert_allclose(recovered[0], recovered[2], atol=1e-6)


def test_same_size_is_not_resampled() -> None:
    spec = ImageInput(height=3, width=4, channels=1, mean=(0.25,), std=(0.5,))
    pixels = np.arange(12, dtype=np.float64).reshape(3, 4) / 11
    tensor = to_model_input(_picture(pixels), spec)
    np.testing.assert_allclose(tensor[0], (pixels.astype(np.float32) - 0.25) / 0.5, atol=1e-7)


def test_reduction_anti_aliases_fine_detail() -> None:
    # One-pixel stripes reduced 8 times: an anti-aliasing filter gives mid-grey; point sampling (what
    # `interpolate` without antialias does) would give all black or all white.
    stripes = np.tile(np.array([0.0, 1.0]), (512, 256))
    spec = ImageInput(height=64, width=64, channels=1)
    tensor = to_model_input(_picture(stripes), spec)
    assert np.abs(tensor - 0.5).max() < 0.02
    assert stripes[::8, ::8].std() == 0.0  # the aliased answer, for contrast


def test_resizing_stays_in_range_without_ringing() -> None:
    step = np.zeros((300, 300))
    step[:, 150:] = 1.0
    spec = ImageInput(height=37, width=53, channels=1)
    tensor = to_model_input(_picture(step), spec)
    assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    assert tensor[0, :, 0].max() == 0.0 and tensor[0, :, -1].min() == 1.0


def test_upscaling_a_small_picture_keeps_its_brightness() -> None:
    small = np.kron(np.array([[0.2, 0.8], [0.6, 0.4]]), np.ones((4, 4)))
    tensor = to_model_input(_picture(small), ImageInput(height=32, width=32, channels=1))
    assert abs(float(tensor.mean()) - small.mean()) < 0.01


def test_to_model_input_is_bit_identical_across_calls() -> None:
    noise = np.random.default_rng(3).random((333, 257))
    picture = _picture(noise)
    assert to_model_input(picture, IMAGENET).tobytes() == to_model_input(picture, IMAGENET).tobytes()


def test_make_picture_clips_freezes_and_refuses_non_finite() -> None:
    picture = _picture(np.array([[-0.5, 0.5, 1.5]]))
    np.testing.assert_array_equal(picture.pixels, [[0.0, 0.5, 1.0]])
    assert picture.pixels.dtype == np.float32 and not picture.pixels.flags.writeable
    with pytest.raises(InvalidImage, match="non-finite"):
        _picture(np.array([[0.0, np.nan]]))


def test_picture_wants_2d_float32() -> None:
    info = ImageInfo("png", 2, 2, 1, 8, None, "RGB", None, None)
    with pytest.raises(ValueError, match="2-D float32"):
        Picture(pixels=np.zeros((2, 2, 3), np.float32), info=info)
    with pytest.raises(ValueError, match="2-D float32"):
        Picture(pixels=np.zeros((2, 2), np.float64), info=info)


def test_bt601_luma_weights() -> None:
    assert BT601_LUMA == (0.299, 0.587, 0.114)


def test_preprocess_reads_and_normalises_an_upload() -> None:
    buffer = BytesIO()
    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(buffer, format="PNG")
    tensor, info = preprocess(buffer.getvalue(), IMAGENET, max_image_pixels=MAX_PIXELS)
    np.testing.assert_allclose(tensor[:, 0, 0], (1.0 - np.asarray(IMAGENET.mean)) / np.asarray(IMAGENET.std), rtol=1e-6)
    assert (info.format, info.rows, info.columns) == ("png", 40, 60)
