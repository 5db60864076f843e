"""The hard cases of docs/x-ray-input.md, each built here with pydicom or Pillow and held to the tensor it must give
(the same picture as its plain encoding, within the stated tolerance) or to its documented refusal code.

Tolerances: exact storages agree to 1e-6 (float32 rounding) or to half a step of their own quantisation; the
reduced-resolution decodes agree with the full decode to a mean |difference| <= 0.005, a 99th percentile
<= 0.05 and a maximum <= 0.15 of the picture's full scale (the maximum is reached only on the sharpest edges).
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.config import disable_value_validation
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

from inferq.config import DEFAULT_REGISTRY_PATH, Settings
from inferq.producers.samples import chest_picture, write_large_samples
from inferq.protocol.errors import NotForPresentation, UnsupportedView
from inferq.protocol.intake import FileUpload, validate_input
from inferq.protocol.media import probe
from inferq.protocol.registry import ImageInput, load_registry
from inferq.workers.imaging import Picture, preprocess, read_picture, to_model_input
from inferq.workers.imaging import codestream as codestream_module
from inferq.workers.imaging.geometry import needed_size, reduction_levels
from inferq.workers.imaging.present import make_picture

MAX_PIXELS = 40_000_000
SPEC = ImageInput(height=24, width=32, channels=1)
FRONTAL_CHEST = ImageInput(height=24, width=32, channels=1, views=("PA", "AP"), body_parts=("CHEST",))
_CR = UID("1.2.840.10008.5.1.4.1.1.1")
_DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
_DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
_ENHANCED_XA = UID("1.2.840.10008.5.1.4.1.1.12.1.1")


def _levels() -> np.ndarray:
    y, x = np.mgrid[0:40, 0:56]
    levels = (x * 5 + y * 3) % 256
    levels[4:12, 6:20] = 255
    levels[22:30, 30:50] = 0
    return levels.astype(np.uint8)


LEVELS = _levels()
LEVELS_12BIT = LEVELS.astype(np.uint16) * 16  # 0 .. 4080
REFERENCE = (LEVELS / 255.0).astype(np.float32)
# A LINEAR window taking stored s = 16 v, rescaled to 2 s - 100, onto v / 255.
_RESCALE = {"RescaleSlope": 2, "RescaleIntercept": -100}
_WINDOW = {"WindowCenter": 3980.5, "WindowWidth": 8161}
_WRONG_WINDOW = {"WindowCenter": 10, "WindowWidth": 2}
HALF_12_BIT_STEP = 0.5 / 4095 + 1e-6  # a LUT with 12-bit entries rounds v / 255 to the nearest 1 / 4095


def _dataset(stored: np.ndarray, *, sop_class: UID = _CR, bits_stored: int | None = None, **attributes: Any) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["inferq-hard-cases"])
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.PatientName = "SYNTHETIC^TEST"
    dataset.Rows, dataset.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        dataset.NumberOfFrames = stored.shape[0]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = stored.dtype.itemsize * 8
    dataset.BitsStored = bits_stored or dataset.BitsAllocated
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = 0
    dataset.PixelData = stored.tobytes()
    with disable_value_validation():
        for keyword, value in attributes.items():
            setattr(dataset, keyword, value)
    return dataset


def _save(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dicom(stored: np.ndarray, **attributes: Any) -> bytes:
    return _save(_dataset(stored, **attributes))


def _item(**attributes: Any) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _lut(descriptor: list[int], data: bytes | list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    if isinstance(data, bytes):
        item.add_new(0x00283006, "OW", data)
    else:
        item.add_new(0x00283006, "US", data)
    return item


def _pixels(data: bytes, spec: ImageInput | None = None) -> np.ndarray:
    return read_picture(data, max_image_pixels=MAX_PIXELS, spec=spec).pixels


def _picture_units(tensor: np.ndarray, spec: ImageInput) -> np.ndarray:
    return tensor * np.asarray(spec.std).reshape(-1, 1, 1) + np.asarray(spec.mean).reshape(-1, 1, 1)


# --- enhanced (multi-frame) objects


def _enhanced(shared: Dataset | None, per_frame: list[Dataset] | None, **top: Any) -> bytes:
    frames = np.stack([LEVELS_12BIT, 4080 - LEVELS_12BIT])
    dataset = _dataset(frames, sop_class=_ENHANCED_XA, bits_stored=12, **top)
    if shared is not None:
        dataset.SharedFunctionalGroupsSequence = Sequence([shared])
    if per_frame is not None:
        dataset.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return _save(dataset)


def _groups(rescale: dict[str, Any] | None = None, window: dict[str, Any] | None = None) -> Dataset:
    group = Dataset()
    if rescale is not None:
        group.PixelValueTransformationSequence = Sequence([_item(RescaleType="US", **rescale)])
    if window is not None:
        group.FrameVOILUTSequence = Sequence([_item(**window)])
    return group


@pytest.mark.parametrize(
    "storage",
    [
        pytest.param(lambda: _enhanced(_groups(_RESCALE, _WINDOW), None), id="shared-groups"),
        pytest.param(
            lambda: _enhanced(None, [_groups(_RESCALE, _WINDOW), _groups(_RESCALE, _WRONG_WINDOW)]), id="per-frame"
        ),
        pytest.param(
            lambda: _enhanced(
                _groups({"RescaleSlope": 5, "RescaleIntercept": 0}, _WRONG_WINDOW),
                [_groups(_RESCALE, _WINDOW), _groups(_RESCALE, _WINDOW)],
            ),
            id="per-frame-beats-shared",
        ),
        pytest.param(lambda: _enhanced(_groups(_RESCALE, _WINDOW), None, **_WRONG_WINDOW), id="groups-beat-top-level"),
        pytest.param(
            lambda: _enhanced(_groups(_RESCALE, None), [_groups(None, _WINDOW), _groups(None, _WRONG_WINDOW)]),
            id="rescale-shared-window-per-frame",
        ),
    ],
)
def test_enhanced_objects_take_rescale_and_window_from_their_functional_groups(storage: Any) -> None:
    np.testing.assert_allclose(_pixels(storage()), REFERENCE, atol=1e-6)


def test_an_enhanced_object_without_groups_falls_back_to_the_stored_range_not_a_wrong_window() -> None:
    np.testing.assert_allclose(_pixels(_enhanced(None, None)), LEVELS_12BIT / 4095.0, atol=1e-6)


# --- For Processing


@pytest.mark.parametrize(
    "attributes",
    [
        {"sop_class": _DX_FOR_PROCESSING},
        {"sop_class": _DX_FOR_PRESENTATION, "PresentationIntentType": "FOR PROCESSING"},
        {"sop_class": UID("1.2.840.10008.5.1.4.1.1.1.2.1")},  # mammography, For Processing
    ],
    ids=["dx-for-processing-class", "intent-for-processing", "mammography-for-processing"],
)
def test_for_processing_images_are_refused_at_intake_and_in_the_worker(attributes: dict[str, Any]) -> None:
    data = _dicom(LEVELS, **attributes)
    for read in (lambda: probe(data, max_image_pixels=MAX_PIXELS), lambda: _pixels(data)):
        with pytest.raises(NotForPresentation) as caught:
            read()
        assert caught.value.to_dict()["code"] == "not_for_presentation"
        assert caught.value.http_status == 422


def test_for_presentation_dx_is_read() -> None:
    data = _dicom(LEVELS, sop_class=_DX_FOR_PRESENTATION, PresentationIntentType="FOR PRESENTATION")
    np.testing.assert_allclose(_pixels(data), REFERENCE, atol=1e-6)


# --- VOI LUT quirks


def _lut_12bit_entries() -> np.ndarray:
    """For each 12-bit input i = 16 v (+ up to 15): v / 255 at a 12-bit output depth (full scale 4095)."""
    return np.minimum(np.rint(np.arange(4096) // 16 * 4095 / 255), 4095).astype(np.uint16)


def test_a_voi_lut_declaring_16_bits_for_12_bit_entries_is_read_at_12_bits() -> None:
    entries = _lut_12bit_entries()
    data = _dicom(LEVELS_12BIT, bits_stored=12, VOILUTSequence=Sequence([_lut([4096, 0, 16], entries.tobytes())]))
    np.testing.assert_allclose(_pixels(data), REFERENCE, atol=HALF_12_BIT_STEP)


def test_a_true_16_bit_voi_lut_keeps_its_depth() -> None:
    entries = (np.arange(4096) // 16 * 257).astype(np.uint16)  # v * 257: 0 .. 65535
    data = _dicom(LEVELS_12BIT, bits_stored=12, VOILUTSequence=Sequence([_lut([4096, 0, 16], entries.tobytes())]))
    np.testing.assert_allclose(_pixels(data), REFERENCE, atol=1e-6)


@pytest.mark.parametrize("endian", [ExplicitVRLittleEndian, ExplicitVRBigEndian], ids=["little", "big"])
def test_voi_lut_first_input_is_signed_when_the_rescale_makes_values_negative(endian: UID) -> None:
    # Stored s = 16 v, unsigned, rescaled by -2048: the VOI LUT starts at -2048, written as the US 63488.
    entries = _lut_12bit_entries()
    dataset = _dataset(
        LEVELS_12BIT,
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=-2048,
        VOILUTSequence=Sequence([_lut([4096, 63488, 16], [int(e) for e in entries])]),
    )
    if endian == ExplicitVRBigEndian:
        dataset.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        dataset.PixelData = LEVELS_12BIT.astype(">u2").tobytes()
    np.testing.assert_allclose(_pixels(_save(dataset)), REFERENCE, atol=HALF_12_BIT_STEP)


def test_voi_lut_first_input_stays_unsigned_when_values_cannot_be_negative() -> None:
    # A LUT for inputs 40000 .. 44095 after a +40000 rescale: 40000 must not be read as -25536.
    entries = _lut_12bit_entries()
    data = _dicom(
        LEVELS_12BIT,
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=40000,
        VOILUTSequence=Sequence([_lut([4096, 40000, 16], entries.tobytes())]),
    )
    np.testing.assert_allclose(_pixels(data), REFERENCE, atol=HALF_12_BIT_STEP)


@pytest.mark.parametrize("vr", ["OW", "US"])
def test_an_odd_8_bit_voi_lut_packed_one_entry_a_byte_is_unpacked(vr: str) -> None:
    count = 4081  # inputs 0 .. 4080, odd: padded to 4082 bytes
    packed = (np.arange(count) // 16).astype(np.uint8).tobytes() + b"\x00"
    data_value: bytes | list[int] = packed if vr == "OW" else list(np.frombuffer(packed, "<u2").tolist())
    data = _dicom(LEVELS_12BIT, bits_stored=12, VOILUTSequence=Sequence([_lut([count, 0, 8], data_value)]))
    np.testing.assert_allclose(_pixels(data), REFERENCE, atol=1e-6)


# --- PNG sBIT


def _with_sbit(png: bytes, bits: int) -> bytes:
    """Insert an sBIT chunk after IHDR (Pillow does not write one)."""
    body = bytes([bits])
    chunk = struct.pack(">I", 1) + b"sBIT" + body + struct.pack(">I", zlib.crc32(b"sBIT" + body))
    ihdr_end = 8 + 8 + 13 + 4
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def _png(array: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


LEVELS_OF_4095 = np.rint(LEVELS / 255.0 * 4095).astype(np.uint16)


def test_12_bit_values_in_a_16_bit_png_with_sbit_scale_by_4095() -> None:
    data = _with_sbit(_png(LEVELS_OF_4095), 12)
    assert probe(data, max_image_pixels=MAX_PIXELS).bits_stored == 12
    np.testing.assert_allclose(_pixels(data), REFERENCE, atol=0.5 / 4095)


def test_a_16_bit_png_scaled_up_as_the_png_standard_asks_keeps_65535() -> None:
    scaled = (LEVELS_OF_4095 << 4) | (LEVELS_OF_4095 >> 8)  # PNG 12.5: left-bit replication
    np.testing.assert_allclose(_pixels(_with_sbit(_png(scaled), 12)), REFERENCE, atol=0.5 / 4095)


def test_a_16_bit_png_without_sbit_scales_by_65535() -> None:
    assert probe(_png(LEVELS_OF_4095), max_image_pixels=MAX_PIXELS).bits_stored == 16
    np.testing.assert_allclose(_pixels(_png(LEVELS_OF_4095)), LEVELS_OF_4095 / 65535.0, atol=1e-6)


# --- geometry


def _white(rows: int, columns: int) -> Picture:
    return make_picture(
        np.ones((rows, columns)), probe(_png(np.zeros((rows, columns), np.uint8)), max_image_pixels=10**6)
    )


def test_stretch_is_the_default_and_fills_the_input() -> None:
    assert SPEC.resize == "stretch"
    np.testing.assert_allclose(to_model_input(_white(40, 80), ImageInput(height=32, width=32))[0], 1.0, atol=1e-6)


def test_letterbox_keeps_the_whole_picture_and_pads_with_black() -> None:
    spec = ImageInput(height=32, width=32, resize="letterbox")
    tensor = to_model_input(_white(40, 80), spec)[0]  # 2:1 -> 32 x 16, centred
    np.testing.assert_allclose(tensor[8:24], 1.0, atol=1e-6)
    np.testing.assert_array_equal(tensor[:8], 0.0)
    np.testing.assert_array_equal(tensor[24:], 0.0)


def test_center_crop_keeps_the_middle_and_its_aspect() -> None:
    pixels = np.zeros((40, 80))
    pixels[:, 16:64] = 1.0  # white a little beyond the middle square (the filter reaches past the crop's edge)
    picture = make_picture(pixels, _white(40, 80).info)
    cropped = to_model_input(picture, ImageInput(height=32, width=32, resize="center-crop"))[0]
    np.testing.assert_allclose(cropped, 1.0, atol=1e-6)
    stretched = to_model_input(picture, ImageInput(height=32, width=32))[0]
    assert stretched[:, :6].max() < 0.05  # the black sides are still there when stretched


def test_center_crop_of_a_tall_picture_keeps_its_middle_rows() -> None:
    pixels = np.zeros((120, 40))
    pixels[30:90] = 1.0  # the middle square is rows 40 .. 80
    picture = make_picture(pixels, _white(120, 40).info)
    np.testing.assert_allclose(to_model_input(picture, ImageInput(height=8, width=8, resize="center-crop")), 1.0)


def test_needed_size_follows_the_fit() -> None:
    assert needed_size(2500, 2000, ImageInput(height=224, width=224)) == (224, 224)
    assert needed_size(2500, 2000, ImageInput(height=224, width=224, resize="letterbox")) == (224, 180)
    assert needed_size(2500, 2000, ImageInput(height=224, width=224, resize="center-crop")) == (280, 224)
    assert reduction_levels(2500, 2000, ImageInput(height=224, width=224), most=5) == 3
    assert reduction_levels(2500, 2000, ImageInput(height=224, width=224), most=2) == 2
    assert reduction_levels(400, 400, ImageInput(height=224, width=224), most=5) == 0


# --- views and body parts


@pytest.mark.parametrize(
    ("attributes", "refused_as"),
    [
        ({"ViewPosition": "LL"}, "LL"),
        ({"ViewPosition": "RL"}, "RL"),
        ({"ViewCodeSequence": Sequence([_item(CodeValue="399067008", CodingSchemeDesignator="SCT")])}, "LATERAL"),
        ({"ViewCodeSequence": Sequence([_item(CodeValue="R-10236", CodingSchemeDesignator="SRT")])}, "LL"),
        ({"ViewPosition": "PA", "BodyPartExamined": "SKULL"}, "SKULL"),
    ],
    ids=["view-position-ll", "view-position-rl", "view-code-lateral", "view-code-srt-left-lateral", "skull"],
)
def test_a_lateral_or_other_part_is_refused_by_a_frontal_chest_model(
    attributes: dict[str, Any], refused_as: str
) -> None:
    data = _dicom(LEVELS, **{"ViewPosition": "", "BodyPartExamined": "CHEST", **attributes})
    with pytest.raises(UnsupportedView, match=refused_as) as caught:
        preprocess(data, FRONTAL_CHEST, max_image_pixels=MAX_PIXELS)
    assert caught.value.to_dict()["code"] == "unsupported_view"
    assert caught.value.http_status == 422
    assert "SYNTHETIC" not in caught.value.message
    assert preprocess(data, SPEC, max_image_pixels=MAX_PIXELS)[0].shape == (1, 24, 32)  # any view for SPEC
    # The submission path refuses it too, at once (HTTP 422), instead of accepting a job that can only fail.
    frontal = load_registry(DEFAULT_REGISTRY_PATH).get_model("chest-xray")
    with pytest.raises(UnsupportedView, match=refused_as):
        validate_input(frontal, FileUpload(data), Settings())


@pytest.mark.parametrize(
    "attributes",
    [
        {"ViewPosition": "PA", "BodyPartExamined": "CHEST"},
        {"ViewPosition": "ap", "BodyPartExamined": "chest"},
        {"ViewCodeSequence": Sequence([_item(CodeValue="272479007", CodingSchemeDesignator="SCT")])},
        {"ViewCodeSequence": Sequence([_item(CodeValue="X", CodeMeaning="antero-posterior")])},
        {},
        {"ViewPosition": "", "BodyPartExamined": ""},
    ],
    ids=["pa-chest", "lower-case", "view-code-pa", "view-meaning-ap", "silent", "empty"],
)
def test_a_frontal_chest_or_a_silent_header_is_accepted(attributes: dict[str, Any]) -> None:
    tensor, info = preprocess(_dicom(LEVELS, **attributes), FRONTAL_CHEST, max_image_pixels=MAX_PIXELS)
    np.testing.assert_allclose(
        _picture_units(tensor, FRONTAL_CHEST)[0],
        to_model_input(make_picture(REFERENCE, info), FRONTAL_CHEST)[0],
        atol=1e-5,
    )


def test_the_chest_model_is_declared_frontal_chest_only() -> None:
    spec = load_registry(Settings().registry_path).get_model("chest-xray").input
    assert isinstance(spec, ImageInput)
    assert (spec.views, spec.body_parts, spec.resize) == (("PA", "AP"), ("CHEST",), "stretch")


def test_png_and_jpeg_say_nothing_of_their_view_and_are_accepted() -> None:
    tensor, info = preprocess(_png(LEVELS), FRONTAL_CHEST, max_image_pixels=MAX_PIXELS)
    assert (info.views, info.body_part) == ((), None)
    assert tensor.shape == (1, 24, 32)


# --- reduced-resolution decoding


MODEL = ImageInput(height=224, width=224, channels=1, mean=(0.449,), std=(0.226,))


def _film(rows: int, columns: int) -> np.ndarray:
    """A chest film with quantum noise, as 12-bit stored values."""
    noise = np.random.default_rng(5).normal(0.0, 0.006, (rows, columns))
    return np.rint(np.clip(chest_picture(rows, columns_px=columns) + noise, 0, 1) * 4095).astype(np.uint16)


def _assert_close_to_full_decode(data: bytes, spec: ImageInput = MODEL) -> None:
    full = _picture_units(to_model_input(read_picture(data, max_image_pixels=MAX_PIXELS), spec), spec)
    reduced = _picture_units(preprocess(data, spec, max_image_pixels=MAX_PIXELS)[0], spec)
    difference = np.abs(reduced - full)
    assert difference.mean() <= 0.005
    assert np.percentile(difference, 99) <= 0.05
    assert difference.max() <= 0.15
    assert full.std() > 0.1  # a real picture, not a blank that would agree with anything


@pytest.fixture
def j2k_levels_used(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the resolution level each JPEG 2000 decode was asked for (the decode itself runs unchanged)."""
    used: list[int] = []
    decode = codestream_module.decode_j2k

    def recording(frame: bytes, header: Any, levels: int) -> np.ndarray:
        used.append(levels)
        return decode(frame, header, levels)

    monkeypatch.setattr("inferq.workers.imaging.dicom.decode_j2k", recording)
    return used


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "center-crop"])
def test_jpeg2000_decodes_the_smallest_level_that_covers_the_input_and_stays_close(
    resize: str, j2k_levels_used: list[int]
) -> None:
    film = _film(1000, 800)
    dataset = _dataset(film, bits_stored=12, **_RESCALE, **_WINDOW)
    dataset.compress(JPEG2000Lossless, film, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    spec = MODEL.model_copy(update={"resize": resize})
    _assert_close_to_full_decode(_save(dataset), spec)
    # 1000 x 800 -> 500 x 400 -> 250 x 200: one halving covers 224 x 224; two do not (except for letterbox).
    assert j2k_levels_used == [2 if resize == "letterbox" else 1]


def test_jpeg2000_at_full_level_is_the_same_picture_as_pydicom_decodes(j2k_levels_used: list[int]) -> None:
    dataset = _dataset(LEVELS_12BIT, bits_stored=12, **_RESCALE, **_WINDOW)
    dataset.compress(JPEG2000Lossless, LEVELS_12BIT, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    np.testing.assert_allclose(_pixels(_save(dataset), SPEC), REFERENCE, atol=1e-6)  # too small to reduce
    assert j2k_levels_used == []


def _jpeg(array: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def test_baseline_jpeg_in_dicom_is_dct_scaled_and_stays_close() -> None:
    film = (_film(1000, 800) >> 4).astype(np.uint8)
    dataset = _dataset(film)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([_jpeg(film)])
    dataset["PixelData"].VR = "OB"
    data = _save(dataset)
    assert _pixels(data, MODEL).shape == (500, 400)  # decoded at half size: 250 x 200 would not cover 224
    _assert_close_to_full_decode(data)


def test_a_jpeg_file_is_dct_scaled_and_stays_close() -> None:
    data = _jpeg((_film(2000, 1800) >> 4).astype(np.uint8))
    assert _pixels(data, MODEL).shape == (250, 225)
    _assert_close_to_full_decode(data)


@pytest.fixture(scope="module")
def large_samples(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_large_samples(tmp_path_factory.mktemp("large"))


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "center-crop"])
def test_a_frame_halved_while_presented_gives_the_tensor_of_the_whole_picture(
    resize: str, large_samples: list[Path]
) -> None:
    # A frame decoded whole is presented a strip at a time and halved as the fit would halve it: the tensor must
    # be the whole picture's, bit for bit, whatever the fit, the size (partial last blocks), padding or inversion.
    spec = MODEL.model_copy(update={"resize": resize})
    film = _film(1001, 803)
    film[:40] = 4095  # outside the exposure
    real = ("image_dfl.dcm", "liver_1frame.dcm", "liver_expb_1frame.dcm")  # deflated, 1-bit, big-endian
    uploads = [
        _dicom(film, PhotometricInterpretation="MONOCHROME1", bits_stored=12, PixelPaddingValue=4095, **_WINDOW),
        large_samples[0].read_bytes(),  # the 12-bit uncompressed DX, 2500 x 2000
        *(Path(get_testdata_file(name)).read_bytes() for name in real),  # type: ignore[arg-type]
    ]
    for data in uploads:
        whole = read_picture(data, max_image_pixels=MAX_PIXELS)
        assert _pixels(data, spec).shape[0] < whole.pixels.shape[0]  # halved while presented
        tensor, _ = preprocess(data, spec, max_image_pixels=MAX_PIXELS)
        assert tensor.tobytes() == to_model_input(whole, spec).tobytes()
        assert _picture_units(tensor, spec).std() > 0.05  # a picture, not a blank that would agree with anything


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "center-crop"])
def test_a_grey_png_halved_while_presented_gives_the_tensor_of_the_whole_picture(resize: str) -> None:
    spec = MODEL.model_copy(update={"resize": resize})
    film = _film(1001, 803)  # 12-bit values
    uploads = [
        _png((film >> 4).astype(np.uint8)),
        _png(film * 16),  # 16-bit, scaled up as the PNG specification asks
        _with_sbit(_png(film), 12),  # 16-bit container, 12 significant bits written unscaled
    ]
    for data in uploads:
        whole = read_picture(data, max_image_pixels=MAX_PIXELS)
        assert _pixels(data, spec).shape[0] < whole.pixels.shape[0]  # halved while presented
        tensor, _ = preprocess(data, spec, max_image_pixels=MAX_PIXELS)
        assert tensor.tobytes() == to_model_input(whole, spec).tobytes()
        assert _picture_units(tensor, spec).std() > 0.05


def test_detector_sized_samples_read_the_same_reduced_or_whole(large_samples: list[Path]) -> None:
    dx, cr_j2k, jpeg, png = large_samples
    for data in (cr_j2k.read_bytes(), jpeg.read_bytes()):
        _assert_close_to_full_decode(data)
    for data in (dx.read_bytes(), png.read_bytes()):  # decoded whole: the same tensor, bit for bit
        whole = to_model_input(read_picture(data, max_image_pixels=MAX_PIXELS), MODEL)
        assert preprocess(data, MODEL, max_image_pixels=MAX_PIXELS)[0].tobytes() == whole.tobytes()
