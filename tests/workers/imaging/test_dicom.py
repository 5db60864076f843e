"""workers.imaging.dicom: DICOM read as a viewer presents it, held to the tensors it must give.

The core test stores one picture in many ways (PNG, RGB, MONOCHROME1/2, 8/12 bits, rescale, window, VOI LUT,
compressed) and requires the same `Picture.pixels` and the same model tensor from each.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.config import disable_value_validation
from pydicom.data import get_charset_files, get_palette_files, get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from inferq.protocol.errors import InferqError, InvalidImage, NoPixelData
from inferq.protocol.media import ImageInfo, open_dicom, unread_pixel_data_offset
from inferq.protocol.registry import ImageInput
from inferq.workers.imaging import Picture, dicom, preprocess, read_picture, to_model_input

MAX_PIXELS = 40_000_000
SPEC = ImageInput(height=24, width=32, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography: any rescale is allowed
_LUT_INPUTS_12BIT = np.arange(4096)


def _levels() -> np.ndarray:
    """The test picture as 8-bit grey levels, 0 and 255 included, not square (catches transposes)."""
    y, x = np.mgrid[0:40, 0:56]
    levels = (x * 5 + y * 3) % 256
    levels[4:12, 6:20] = 255
    levels[22:30, 30:50] = 0
    return levels.astype(np.uint8)


LEVELS = _levels()
LEVELS_12BIT = LEVELS.astype(np.uint16) * 16  # 0 .. 4080
REFERENCE = (LEVELS / 255.0).astype(np.float32)


def _info() -> ImageInfo:
    return ImageInfo("png", 40, 56, 1, 8, None, "MONOCHROME2", None, None)


def _reference_tensor() -> np.ndarray:
    return to_model_input(Picture(pixels=REFERENCE, info=_info()), SPEC)


def _dicom(
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    **attributes: object,
) -> bytes:
    """A Part 10 file holding `stored` (frames first when 3-D grey or 4-D colour) as stored values."""
    colour = photometric in ("RGB", "YBR_FULL")
    dataset = _base_dataset()
    frame_shape = stored.shape[-3:-1] if colour else stored.shape[-2:]
    dataset.Rows, dataset.Columns = frame_shape
    if stored.ndim == (4 if colour else 3):
        dataset.NumberOfFrames = stored.shape[0]
    dataset.SamplesPerPixel = 3 if colour else 1
    if colour:
        dataset.PlanarConfiguration = 0
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = stored.dtype.itemsize * 8
    dataset.BitsStored = bits_stored or dataset.BitsAllocated
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    with disable_value_validation():
        for keyword, value in attributes.items():
            setattr(dataset, keyword, value)
    return _encode(dataset, stored, transfer_syntax)


def _base_dataset() -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = _CR_STORAGE
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["inferq-test"])
    dataset.SOPClassUID = _CR_STORAGE
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.PatientName = "SYNTHETIC^TEST"
    return dataset


def _encode(dataset: Dataset, stored: np.ndarray, transfer_syntax: UID) -> bytes:
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.PixelData = stored.tobytes()
    if transfer_syntax.is_encapsulated:
        dataset.compress(transfer_syntax, stored, generate_instance_uid=False)
    else:
        big_endian = transfer_syntax == ExplicitVRBigEndian
        dataset.PixelData = stored.astype(stored.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
        dataset.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _lut_item(descriptor: list[int], entries: np.ndarray, *, as_bytes: bool = False) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    if as_bytes:
        item.add_new(0x00283006, "OW", entries.astype("<u2").tobytes())
    else:
        item.add_new(0x00283006, "US", [int(value) for value in entries])
    return item


def _png(array: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _read(data: bytes) -> Picture:
    return read_picture(data, max_image_pixels=MAX_PIXELS)


def _testdata(name: str) -> bytes:
    return Path(str(get_testdata_file(name))).read_bytes()


# A LINEAR window mapping 12-bit stored values s = 16 v, rescaled to 2 s - 100, onto v / 255:
# lowest output at c - 0.5 - (w - 1) / 2 = -100, highest at c - 0.5 + (w - 1) / 2 = 2 * 4080 - 100.
_RESCALED_WINDOW: dict[str, Any] = {
    "RescaleSlope": 2,
    "RescaleIntercept": -100,
    "WindowCenter": 3980.5,
    "WindowWidth": 8161,
}
# A LINEAR window mapping stored 0 .. 4080 onto 0 .. 1.
_WINDOW_4080: dict[str, Any] = {"WindowCenter": 2040.5, "WindowWidth": 4081}


def _with_unused_high_bits(stored: np.ndarray) -> np.ndarray:
    """Set bit 13 (outside BitsStored 12) on half the pixels, as old overlays in pixel data do."""
    noisy = stored.copy()
    noisy[::2] |= 1 << 13
    return noisy


def _grey3(levels: np.ndarray) -> np.ndarray:
    return np.stack([levels, levels, levels], axis=-1)


SAME_PICTURE: dict[str, Callable[[], bytes]] = {
    "png-8bit": lambda: _png(LEVELS),
    "png-16bit": lambda: _png(LEVELS.astype(np.uint16) * 257),
    "png-rgb": lambda: _png(_grey3(LEVELS)),
    "mono2-8bit": lambda: _dicom(LEVELS),
    "mono1-8bit": lambda: _dicom(255 - LEVELS, photometric="MONOCHROME1"),
    "mono2-presentation-inverse": lambda: _dicom(255 - LEVELS, PresentationLUTShape="INVERSE"),
    "mono1-with-dx-inverse-once": lambda: _dicom(
        255 - LEVELS, photometric="MONOCHROME1", PresentationLUTShape="INVERSE"
    ),
    "12bit-rescale-window": lambda: _dicom(_with_unused_high_bits(LEVELS_12BIT), bits_stored=12, **_RESCALED_WINDOW),
    "12bit-multivalued-window-first-wins": lambda: _dicom(
        LEVELS_12BIT,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=[3980.5, 10],
        WindowWidth=[8161, 2],
    ),
    "12bit-signed-rescaled": lambda: _dicom(
        (LEVELS_12BIT.astype(np.int16) - 2048), bits_stored=12, RescaleSlope=1, RescaleIntercept=2048, **_WINDOW_4080
    ),
    "linear-exact-window": lambda: _dicom(LEVELS, WindowCenter=127.5, WindowWidth=255, VOILUTFunction="LINEAR_EXACT"),
    "voi-lut-sequence-8bit-entries-beats-window": lambda: _dicom(
        LEVELS_12BIT,
        bits_stored=12,
        VOILUTSequence=[_lut_item([4096, 0, 8], _LUT_INPUTS_12BIT // 16)],
        WindowCenter=100,
        WindowWidth=10,
    ),
    "voi-lut-sequence-16bit-ow": lambda: _dicom(
        LEVELS_12BIT,
        bits_stored=12,
        VOILUTSequence=[_lut_item([4096, 0, 16], (_LUT_INPUTS_12BIT // 16) * 257, as_bytes=True)],
    ),
    "modality-lut-sequence-then-window": lambda: _dicom(
        LEVELS,
        ModalityLUTSequence=[_lut_item([256, 0, 16], np.arange(256) * 10)],
        WindowCenter=1275.5,
        WindowWidth=2551,
    ),
    "smallest-largest-pixel-value": lambda: _dicom(
        LEVELS_12BIT + 1000, bits_stored=13, SmallestImagePixelValue=1000, LargestImagePixelValue=5080
    ),
    "rgb": lambda: _dicom(_grey3(LEVELS), photometric="RGB"),
    "ybr-full": lambda: _dicom(
        np.stack([LEVELS, np.full_like(LEVELS, 128), np.full_like(LEVELS, 128)], axis=-1), photometric="YBR_FULL"
    ),
    "palette-color": lambda: _dicom(LEVELS, photometric="PALETTE COLOR", **_grey_palette()),
    "multi-frame-reads-frame-0": lambda: _dicom(np.stack([LEVELS, 255 - LEVELS])),
    "rle-8bit": lambda: _dicom(LEVELS, transfer_syntax=RLELossless),
    "rle-12bit-window": lambda: _dicom(LEVELS_12BIT, bits_stored=12, transfer_syntax=RLELossless, **_RESCALED_WINDOW),
    "rle-multi-frame": lambda: _dicom(np.stack([LEVELS, 255 - LEVELS]), transfer_syntax=RLELossless),
    "j2k-lossless-12bit-window": lambda: _dicom(
        LEVELS_12BIT, bits_stored=12, transfer_syntax=JPEG2000Lossless, **_RESCALED_WINDOW
    ),
    "j2k-lossless-mono1": lambda: _dicom(
        4080 - LEVELS_12BIT, photometric="MONOCHROME1", bits_stored=12, transfer_syntax=JPEG2000Lossless, **_WINDOW_4080
    ),
    "implicit-vr": lambda: _dicom(
        LEVELS_12BIT, bits_stored=12, transfer_syntax=ImplicitVRLittleEndian, **_RESCALED_WINDOW
    ),
    "big-endian": lambda: _dicom(LEVELS_12BIT, bits_stored=12, transfer_syntax=ExplicitVRBigEndian, **_RESCALED_WINDOW),
    "deflated": lambda: _dicom(
        LEVELS_12BIT, bits_stored=12, transfer_syntax=DeflatedExplicitVRLittleEndian, **_RESCALED_WINDOW
    ),
}


def _grey_palette() -> dict[str, Any]:
    entries = (np.arange(256, dtype=np.uint16) * 257).astype("<u2").tobytes()
    palette: dict[str, Any] = {}
    for colour in ("Red", "Green", "Blue"):
        palette[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        palette[f"{colour}PaletteColorLookupTableData"] = entries
    return palette


@pytest.mark.parametrize("storage", list(SAME_PICTURE))
def test_the_same_picture_stored_any_way_gives_the_same_pixels_and_tensor(storage: str) -> None:
    picture = _read(SAME_PICTURE[storage]())
    assert picture.pixels.dtype == np.float32
    np.testing.assert_allclose(picture.pixels, REFERENCE, rtol=0, atol=1e-6)
    np.testing.assert_allclose(to_model_input(picture, SPEC), _reference_tensor(), rtol=0, atol=1e-5)


def test_reference_tensor_is_not_trivial() -> None:
    tensor = _reference_tensor()
    assert tensor.shape == (3, 24, 32)
    assert tensor.std() > 0.5  # a blank or constant picture would pass the comparisons above


# --- steps on their own


def test_padding_pixels_are_black_in_monochrome2_and_monochrome1() -> None:
    padded = LEVELS_12BIT.copy()
    padded[:, :3] = 4095  # outside the exposure
    expected = REFERENCE.copy()
    expected[:, :3] = 0.0
    mono2 = _read(_dicom(padded, bits_stored=12, PixelPaddingValue=4095, **_WINDOW_4080)).pixels
    np.testing.assert_allclose(mono2, expected, atol=1e-6)
    inverted = np.where(padded == 4095, 4095, 4080 - LEVELS_12BIT).astype(np.uint16)
    mono1 = _read(
        _dicom(inverted, photometric="MONOCHROME1", bits_stored=12, PixelPaddingValue=4095, **_WINDOW_4080)
    ).pixels
    np.testing.assert_allclose(mono1, expected, atol=1e-6)


def test_padding_range_limit_covers_a_range_of_stored_values() -> None:
    padded = LEVELS_12BIT.copy()
    padded[0, :] = 4090
    padded[1, :] = 4093
    picture = _read(_dicom(padded, bits_stored=12, PixelPaddingValue=4095, PixelPaddingRangeLimit=4090, **_WINDOW_4080))
    assert np.all(picture.pixels[:2] == 0.0)
    np.testing.assert_allclose(picture.pixels[2:], REFERENCE[2:], atol=1e-6)


def test_window_output_range_is_exact_even_when_rescale_makes_values_negative() -> None:
    # CT-like: stored 0..4095 with intercept -1024 gives -1024..3071; a window over -160..240 clips both ends.
    stored = np.array([[0, 864, 1024 - 160, 1024 + 240, 4095]], dtype=np.uint16)
    picture = _read(
        _dicom(stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40.5, WindowWidth=401)
    )
    np.testing.assert_allclose(picture.pixels, [[0.0, 0.0, 0.0, 1.0, 1.0]], atol=1e-7)


def test_linear_window_of_width_one_is_a_threshold() -> None:
    picture = _read(_dicom(np.array([[99, 100, 101]], np.uint8), WindowCenter=100.5, WindowWidth=1))
    np.testing.assert_array_equal(picture.pixels, [[0.0, 0.0, 1.0]])


def test_sigmoid_window_follows_ps3_3_c_11_2_1_3_1() -> None:
    picture = _read(_dicom(LEVELS, WindowCenter=128, WindowWidth=64, VOILUTFunction="SIGMOID"))
    expected = 1.0 / (1.0 + np.exp(-4.0 * (LEVELS.astype(np.float64) - 128) / 64))
    np.testing.assert_allclose(picture.pixels, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"WindowCenter": 100, "WindowWidth": 0}, "Window Width"),
        ({"WindowCenter": 100, "WindowWidth": 0, "VOILUTFunction": "SIGMOID"}, "Window Width"),
        ({"WindowCenter": 100, "WindowWidth": 20, "VOILUTFunction": "GAMMA"}, "VOI LUT Function"),
        ({"RescaleSlope": 0, "RescaleIntercept": 0}, "Rescale Slope"),
    ],
)
def test_unusable_windows_and_rescales_are_invalid_images(attributes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        _read(_dicom(LEVELS, **attributes))


def test_no_window_uses_the_stored_range_not_the_image_range() -> None:
    # An image using only 1000..2000 of its 12 bits stays grey; a min/max stretch would make it 0..1.
    stored = np.linspace(1000, 2000, 40 * 56).reshape(40, 56).astype(np.uint16)
    picture = _read(_dicom(stored, bits_stored=12))
    np.testing.assert_allclose(picture.pixels, stored / 4095.0, atol=1e-6)


def test_multi_frame_reads_frame_zero_even_when_other_frames_differ() -> None:
    frames = np.stack([LEVELS, 255 - LEVELS, np.zeros_like(LEVELS)])
    picture = _read(_dicom(frames))
    np.testing.assert_allclose(picture.pixels, REFERENCE, atol=1e-6)
    assert picture.info.frames == 3


def test_reading_is_deterministic_and_the_picture_is_read_only() -> None:
    data = SAME_PICTURE["j2k-lossless-12bit-window"]()
    first, second = _read(data), _read(data)
    assert first.pixels.tobytes() == second.pixels.tobytes()
    assert to_model_input(first, SPEC).tobytes() == to_model_input(second, SPEC).tobytes()
    with pytest.raises(ValueError, match="read-only"):
        first.pixels[0, 0] = 0.5


def test_preprocess_gives_the_tensor_and_the_info() -> None:
    tensor, info = preprocess(SAME_PICTURE["mono1-8bit"](), SPEC, max_image_pixels=MAX_PIXELS)
    np.testing.assert_allclose(tensor, _reference_tensor(), atol=1e-5)
    assert (info.rows, info.columns, info.photometric_interpretation) == (40, 56, "MONOCHROME1")


# --- real files bundled with pydicom


MR_SMALL_FAMILY = [
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
]


def test_mr_small_family_gives_identical_tensors_across_transfer_syntaxes() -> None:
    tensors = {name: to_model_input(_read(_testdata(name)), SPEC) for name in MR_SMALL_FAMILY}
    reference = tensors["MR_small.dcm"]
    for name, tensor in tensors.items():
        assert tensor.tobytes() == reference.tobytes(), name


def test_mr_small_is_windowed_by_its_header_window() -> None:
    dataset = pydicom.dcmread(str(get_testdata_file("MR_small.dcm")))
    center, width = float(dataset.WindowCenter), float(dataset.WindowWidth)
    stored = dataset.pixel_array.astype(np.float64)
    expected = np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    picture = _read(_testdata("MR_small.dcm"))
    np.testing.assert_allclose(picture.pixels, expected, atol=1e-6)
    assert 0.1 < picture.pixels.mean() < 0.9


def test_a_voi_lut_sequence_is_preferred_to_the_window_in_a_real_file() -> None:
    dataset = pydicom.dcmread(str(get_testdata_file("MR_small.dcm")))
    stored = dataset.pixel_array
    low, count = int(stored.min()), int(stored.max() - stored.min() + 1)
    gamma = np.rint(65535 * np.linspace(0, 1, count) ** 0.5).astype(np.uint16)
    dataset.VOILUTSequence = [_lut_item([count, low, 16], gamma, as_bytes=True)]
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    picture = _read(buffer.getvalue())
    np.testing.assert_allclose(picture.pixels, gamma[stored - low] / 65535.0, atol=1e-6)


def test_sc_rgb_variants_agree_lossless_exactly_and_lossy_within_tolerance() -> None:
    reference = _read(_testdata("SC_rgb_rle.dcm")).pixels
    rgb = pydicom.dcmread(str(get_testdata_file("SC_rgb_rle.dcm"))).pixel_array.astype(np.float64)
    bt601 = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    np.testing.assert_allclose(reference, bt601, atol=1e-6)
    for name in ("SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm"):
        np.testing.assert_allclose(_read(_testdata(name)).pixels, reference, atol=1e-6, err_msg=name)
    lossy = [
        "SC_rgb_dcmtk_+eb+cr.dcm",
        "SC_rgb_dcmtk_+eb+cy+n1.dcm",
        "SC_rgb_dcmtk_+eb+cy+n2.dcm",
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",
        "SC_rgb_dcmtk_+eb+cy+s4.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_jpeg_lossy_gdcm.dcm",
        "SC_rgb_jls_lossy_line.dcm",
        "SC_rgb_jls_lossy_sample.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
    ]
    for name in lossy:
        difference = np.abs(_read(_testdata(name)).pixels - reference)
        assert difference.max() < 0.04 and difference.mean() < 0.005, name


def test_a_real_monochrome1_file_is_inverted() -> None:
    name = "dicomdirtests/77654033/CR1/6154"
    data = _testdata(name)
    as_stored = pydicom.dcmread(BytesIO(data))
    as_stored.PhotometricInterpretation = "MONOCHROME2"
    buffer = BytesIO()
    as_stored.save_as(buffer, enforce_file_format=True)
    mono1, mono2 = _read(data).pixels, _read(buffer.getvalue()).pixels
    assert mono2.std() > 0.01
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_a_real_multi_frame_file_reads_its_first_frame() -> None:
    frames = pydicom.dcmread(str(get_testdata_file("SC_rgb_rle_2frame.dcm"))).pixel_array
    assert not np.array_equal(frames[0], frames[1])
    two = _read(_testdata("SC_rgb_rle_2frame.dcm"))
    np.testing.assert_array_equal(two.pixels, _read(_testdata("SC_rgb_rle.dcm")).pixels)
    assert two.info.frames == 2


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm"])
def test_objects_without_pixels_give_no_pixel_data(name: str) -> None:
    with pytest.raises(NoPixelData):
        _read(_testdata(name))


@pytest.mark.parametrize(
    "name",
    ["MR_truncated.dcm", "JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "badVR.dcm", "no_meta.dcm"],
)
def test_known_broken_files_are_refused_cleanly(name: str) -> None:
    with pytest.raises(InferqError) as caught:
        _read(_testdata(name))
    assert caught.value.http_status in (413, 415, 422)


def test_a_codestream_larger_than_its_header_is_refused_before_decoding() -> None:
    data = SAME_PICTURE["j2k-lossless-12bit-window"]()
    siz = data.index(b"\xff\x4f\xff\x51")
    claimed = (40000).to_bytes(4, "big") * 2  # Xsiz and Ysiz
    bomb = data[: siz + 8] + claimed + data[siz + 16 :]
    with pytest.raises(InvalidImage, match="compressed frame is 40000 x 40000"):
        _read(bomb)


def _bundled_files() -> list[Path]:
    paths = [*get_testdata_files(), *get_charset_files(), *get_palette_files()]
    return sorted(path for path in map(Path, paths) if path.is_file())


def _damaged(data: bytes) -> list[bytes]:
    """Cuts in the header, the middle and the last byte, and a stretch of bytes overwritten mid-file."""
    middle = len(data) // 2
    overwritten = data[:middle] + bytes(reversed(data[middle : middle + 64])) + data[middle + 64 :]
    return [data[:200], data[:middle], data[:-1], overwritten]


def test_every_bundled_file_and_its_damaged_copies_give_a_picture_or_our_error() -> None:
    outcomes = {"pictures": 0, "refusals": 0}
    for path in _bundled_files():
        data = path.read_bytes()
        for variant in [data, *_damaged(data)]:
            try:
                picture = _read(variant)
            except InferqError:
                outcomes["refusals"] += 1
                continue
            pixels = picture.pixels
            assert pixels.ndim == 2 and pixels.dtype == np.float32, path.name
            assert np.all(np.isfinite(pixels)) and pixels.min() >= 0.0 and pixels.max() <= 1.0, path.name
            outcomes["pictures"] += 1
    assert outcomes["pictures"] > 150 and outcomes["refusals"] > 300


# --- uncompressed frames read in place


def _in_place(data: bytes) -> bool:
    info, dataset = open_dicom(data, max_image_pixels=MAX_PIXELS)
    return dicom._as_stored(dataset, info, data) is not None


def _through_the_decoder(data: bytes, monkeypatch: pytest.MonkeyPatch, spec: ImageInput | None = None) -> Any:
    """What `read_picture` (or, given `spec`, `preprocess`) gives when pydicom's decoder reads the frame."""
    with monkeypatch.context() as patched:
        patched.setattr(dicom, "_IN_PLACE_SYNTAXES", ())
        assert not _in_place(data)
        if spec is None:
            return _read(data)
        return preprocess(data, spec, max_image_pixels=MAX_PIXELS)[0]


def test_every_bundled_uncompressed_grey_frame_read_in_place_presents_as_the_decoded_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared = 0
    for path in _bundled_files():
        data = path.read_bytes()
        try:
            if not _in_place(data):
                continue
            picture = _read(data)
        except InferqError:
            continue
        decoded = _through_the_decoder(data, monkeypatch)
        assert picture.pixels.tobytes() == decoded.pixels.tobytes(), path.name
        compared += 1
    # CT_small (signed), MR_small (explicit, implicit, padded) and examples_overlay: the rest are compressed,
    # big-endian, colour, or small enough that pydicom reads their pixels with the header.
    assert compared >= 5


@pytest.mark.parametrize(
    ("stored", "bits_stored", "clean"),
    [
        # 12-bit unsigned values with the 4 unused bits set at random: they must be cleared.
        (
            LEVELS_12BIT | (np.random.default_rng(3).integers(0, 16, LEVELS.shape).astype(np.uint16) << 12),
            12,
            LEVELS_12BIT,
        ),
        # 12-bit signed values written without sign extension (0x0FFF for -1): they must be sign-extended.
        (
            ((LEVELS.astype(np.int16) * 16 - 2048) & 0x0FFF).astype(np.int16),
            12,
            (LEVELS.astype(np.int16) * 16 - 2048),
        ),
        # 7-bit values in 8-bit samples, the top bit set on every other pixel.
        ((LEVELS >> 1) | (np.indices(LEVELS.shape).sum(axis=0) % 2 << 7).astype(np.uint8), 7, LEVELS >> 1),
    ],
    ids=["12bit-unsigned", "12bit-signed", "7bit-in-8"],
)
def test_bits_above_bits_stored_are_ignored_as_pydicom_ignores_them(
    stored: np.ndarray, bits_stored: int, clean: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiled so that the fit halves the picture while presenting it, as it does a detector-sized film.
    tiles = (4, 4)
    data = _dicom(np.tile(stored, tiles), bits_stored=bits_stored)
    assert _in_place(data)
    expected = _read(_dicom(np.tile(clean.astype(stored.dtype), tiles), bits_stored=bits_stored))
    assert _read(data).pixels.tobytes() == expected.pixels.tobytes()
    assert _read(data).pixels.tobytes() == _through_the_decoder(data, monkeypatch).pixels.tobytes()
    tensor = preprocess(data, SPEC, max_image_pixels=MAX_PIXELS)[0]
    assert tensor.tobytes() == _through_the_decoder(data, monkeypatch, SPEC).tobytes()
    assert np.ptp(tensor) > 1.0  # a picture, not a constant


def test_only_uncompressed_little_endian_grey_frames_are_read_in_place() -> None:
    assert _in_place(_dicom(LEVELS_12BIT, bits_stored=12, transfer_syntax=ImplicitVRLittleEndian))
    assert not _in_place(_dicom(LEVELS_12BIT, bits_stored=12, transfer_syntax=ExplicitVRBigEndian))
    assert not _in_place(_dicom(LEVELS_12BIT, bits_stored=12, transfer_syntax=DeflatedExplicitVRLittleEndian))
    assert not _in_place(_dicom(LEVELS_12BIT, bits_stored=12, transfer_syntax=RLELossless))
    rgb = np.repeat(LEVELS[..., None], 3, axis=2)
    assert not _in_place(_dicom(rgb, photometric="RGB"))


def test_a_compressed_frame_is_read_from_the_upload_as_pydicom_reads_it_from_the_pixel_data() -> None:
    from_upload = 0
    for path in _bundled_files():
        data = path.read_bytes()
        try:
            info, dataset = open_dicom(data, max_image_pixels=MAX_PIXELS)
            deferred = unread_pixel_data_offset(dataset) is not None
            frame = dicom._encapsulated_frame(dataset, info, data)
        except Exception:  # refused or damaged: what the reader makes of those files is tested above
            continue
        if frame is None or not deferred:  # uncompressed, RLE, or small enough to be read with the header
            continue
        # Still deferred: the frame came from the upload's bytes, not from the pixel data read whole.
        assert unread_pixel_data_offset(dataset) is not None, path.name
        offsets = dicom._offsets(dataset)
        expected = get_frame(dataset.PixelData, 0, number_of_frames=info.frames, extended_offsets=offsets)
        assert frame == bytes(expected), path.name
        from_upload += 1
    # JPEG, JPEG-LS and JPEG 2000; a frame in three fragments (examples_jpeg2k), 30 frames (examples_ybr_color).
    assert from_upload >= 8
