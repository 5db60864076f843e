"""workers.imaging.raster: PNG and JPEG uploads to grey pictures, each Pillow mode at its own full scale."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from inferq.protocol.errors import ImageTooLarge, InvalidImage, UnsupportedMedia
from inferq.workers.imaging import read_picture
from inferq.workers.imaging.raster import _grey, read_raster

MAX_PIXELS = 40_000_000
_EXIF_ORIENTATION = 0x0112


def _encode(image: Image.Image, image_format: str = "PNG", **options: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return read_picture(data, max_image_pixels=MAX_PIXELS).pixels


def _ramp(height_px: int = 12, width_px: int = 20) -> np.ndarray:
    y, x = np.mgrid[0:height_px, 0:width_px]
    return ((x * 13 + y * 7) % 256).astype(np.uint8)


def test_8bit_grey_png_scales_by_255() -> None:
    levels = _ramp()
    np.testing.assert_allclose(_pixels(_encode(Image.fromarray(levels))), levels / 255.0, atol=1e-7)


def test_16bit_png_scales_by_65535_not_255() -> None:
    values = np.array([[0, 1, 257, 1000], [32768, 65000, 65534, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"  # what Pillow makes of uint16, and what a 16-bit grey PNG opens as
    pixels = _pixels(_encode(image))
    np.testing.assert_allclose(pixels, values / 65535.0, atol=1e-7)
    assert 0.0 < pixels[0, 1] < 1e-4  # scaled by 255 it would be 1/255


def test_rgb_png_reduces_with_bt601_luma() -> None:
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30]]], dtype=np.uint8)
    pixels = _pixels(_encode(Image.fromarray(colours)))
    expected = [[0.299, 0.587, 0.114, 1.0, (0.299 * 10 + 0.587 * 20 + 0.114 * 30) / 255]]
    np.testing.assert_allclose(pixels, expected, atol=1e-6)


def test_grey_stored_as_rgb_equals_grey() -> None:
    levels = _ramp()
    rgb = np.stack([levels] * 3, axis=-1)
    np.testing.assert_allclose(_pixels(_encode(Image.fromarray(rgb))), levels / 255.0, atol=1e-6)


def test_rgba_and_la_composite_over_black() -> None:
    rgba = np.array([[[255, 255, 255, 255], [255, 255, 255, 128], [255, 0, 0, 0], [0, 255, 0, 255]]], np.uint8)
    np.testing.assert_allclose(
        _pixels(_encode(Image.fromarray(rgba, "RGBA"))), [[1.0, 128 / 255, 0.0, 0.587]], atol=1e-6
    )
    grey_alpha = Image.merge("LA", [Image.new("L", (2, 1), 200), Image.frombytes("L", (2, 1), bytes([255, 51]))])
    np.testing.assert_allclose(_pixels(_encode(grey_alpha)), [[200 / 255, 200 / 255 * 0.2]], atol=1e-6)


def test_palette_png_uses_its_colours_and_transparency() -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 255, 255, 255, 0, 0, 255] + [0] * (253 * 3))
    image.putdata([0, 1, 2])
    np.testing.assert_allclose(_pixels(_encode(image)), [[0.0, 1.0, 0.114]], atol=1e-6)
    np.testing.assert_allclose(_pixels(_encode(image, transparency=1)), [[0.0, 0.0, 0.114]], atol=1e-6)


def test_1bit_png_is_black_and_white() -> None:
    image = Image.fromarray(np.array([[True, False, True]]))
    assert image.mode == "1"
    np.testing.assert_array_equal(_pixels(_encode(image)), [[1.0, 0.0, 1.0]])


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16B", np.array([[0, 257, 65535]], np.uint16), [[0.0, 257 / 65535, 1.0]]),
        ("I", np.array([[0, 32768, 65535]], np.int32), [[0.0, 32768 / 65535, 1.0]]),
        ("F", np.array([[0.0, 0.25, 1.0]], np.float32), [[0.0, 0.25, 1.0]]),
    ],
)
def test_other_grey_modes_use_their_own_full_scale(mode: str, values: np.ndarray, expected: list[list[float]]) -> None:
    if mode == "I;16B":
        image = Image.frombytes(mode, (3, 1), values.astype(">u2").tobytes())
    else:
        image = Image.fromarray(values)
    assert image.mode == mode
    np.testing.assert_allclose(np.clip(_grey(image), 0, 1), expected, atol=1e-7)


def test_cmyk_jpeg_is_converted_then_reduced() -> None:
    image = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    assert _pixels(_encode(image, "JPEG", quality=95)).min() > 0.98


def test_jpeg_grey_and_colour_are_close_to_their_source() -> None:
    levels = np.kron(_ramp(6, 10), np.ones((8, 8), np.uint8))  # flat 8x8 blocks survive JPEG well
    grey = _pixels(_encode(Image.fromarray(levels), "JPEG", quality=95))
    assert np.abs(grey - levels / 255.0).mean() < 0.01
    colour = _pixels(_encode(Image.fromarray(np.stack([levels] * 3, -1)), "JPEG", quality=95))
    assert np.abs(colour - levels / 255.0).mean() < 0.01


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(image_format: str) -> None:
    stored = np.kron(np.array([[0, 255], [128, 64], [200, 30]], np.uint8), np.ones((8, 8), np.uint8))  # 24 x 16
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 6  # the camera was turned: rotate 90 degrees clockwise to display
    data = _encode(
        Image.fromarray(stored), image_format, exif=exif, **({"quality": 95} if image_format == "JPEG" else {})
    )
    picture = read_picture(data, max_image_pixels=MAX_PIXELS)
    upright = np.rot90(stored, k=-1) / 255.0
    assert picture.pixels.shape == (16, 24)
    assert (picture.info.rows, picture.info.columns) == (24, 16)  # the info describes the file as stored
    tolerance = 1e-7 if image_format == "PNG" else 0.03
    assert np.abs(picture.pixels - upright).mean() < tolerance


def test_animated_png_reads_its_first_frame() -> None:
    first, second = Image.fromarray(_ramp()), Image.fromarray(255 - _ramp())
    data = _encode(first, save_all=True, append_images=[second])
    picture = read_picture(data, max_image_pixels=MAX_PIXELS)
    assert picture.info.frames == 2
    np.testing.assert_allclose(picture.pixels, _ramp() / 255.0, atol=1e-7)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: data[:60] + bytes(64) + data[124:],
        lambda data: data.replace(b"IDAT", b"IDAX"),
    ],
    ids=["truncated", "overwritten", "no-image-data"],
)
def test_damaged_png_is_an_invalid_image(damage: object) -> None:
    noisy = np.random.default_rng(7).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible, so long
    data = _encode(Image.fromarray(noisy))
    with pytest.raises(InvalidImage):
        read_picture(damage(data), max_image_pixels=MAX_PIXELS)  # type: ignore[operator]


def test_truncated_jpeg_is_an_invalid_image() -> None:
    noisy = np.random.default_rng(8).integers(0, 256, (64, 64), dtype=np.uint8)
    data = _encode(Image.fromarray(noisy), "JPEG")
    with pytest.raises(InvalidImage):
        read_picture(data[: len(data) // 2], max_image_pixels=MAX_PIXELS)


def test_size_limit_applies_before_decoding() -> None:
    data = _encode(Image.fromarray(_ramp(100, 100)))
    assert read_picture(data, max_image_pixels=10_000).pixels.shape == (100, 100)
    with pytest.raises(ImageTooLarge):
        read_picture(data, max_image_pixels=9_999)


def test_read_raster_refuses_dicom() -> None:
    dicom = Path(str(get_testdata_file("MR_small.dcm"))).read_bytes()
    with pytest.raises(UnsupportedMedia):
        read_raster(dicom, max_image_pixels=MAX_PIXELS)


def test_reading_is_deterministic() -> None:
    data = _encode(Image.fromarray(np.stack([_ramp()] * 3, -1)), "JPEG", quality=80)
    assert _pixels(data).tobytes() == _pixels(data).tobytes()
