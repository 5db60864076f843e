"""protocol.media: sniffing and header probing, refusing bad uploads before any pixel is decoded."""

from __future__ import annotations

import json
import logging
import struct
import warnings
import zlib
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.config import disable_value_validation
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, DeflatedExplicitVRLittleEndian

from inferq.protocol.errors import ImageTooLarge, InvalidImage, NoPixelData, UnsupportedMedia, UnsupportedView
from inferq.protocol.media import (
    ImageInfo,
    MediaKind,
    check_fits,
    open_dicom,
    png_chunks,
    probe,
    sniff,
    unread_pixel_data_offset,
)
from inferq.protocol.registry import ImageInput

MAX_PIXELS = 40_000_000
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "MRN-7734251"


def _testdata(name: str) -> bytes:
    return Path(str(get_testdata_file(name))).read_bytes()


def _save(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _mr_small(**changes: object) -> Dataset:
    """MR_small with identifying attributes set to known fake values, then `changes` applied."""
    dataset = dcmread(str(get_testdata_file("MR_small.dcm")))
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.AccessionNumber = "ACC-99120"
    dataset.InstitutionName = "Saint Nowhere Hospital"
    with disable_value_validation():  # some tests need values pydicom would warn about
        for keyword, value in changes.items():
            if value is None:
                delattr(dataset, keyword)
            else:
                setattr(dataset, keyword, value)
    return dataset


def _png(array: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width_px: int, height_px: int) -> bytes:
    """A PNG whose IHDR claims a size, followed by one tiny IDAT: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width_px, height_px, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


# --- sniff


def test_sniff_recognises_each_kind_by_magic_bytes() -> None:
    assert sniff(_testdata("MR_small.dcm")) is MediaKind.DICOM
    assert sniff(_png(np.zeros((4, 4), np.uint8))) is MediaKind.PNG
    assert sniff(b"\xff\xd8\xff\xe0" + b"\x00" * 20) is MediaKind.JPEG


def test_sniff_prefers_dicom_when_the_preamble_is_another_format() -> None:
    dicom = _testdata("MR_small.dcm")
    polyglot = _png(np.zeros((2, 2), np.uint8))[:128].ljust(128, b"\x00") + dicom[128:]
    assert polyglot.startswith(b"\x89PNG")
    assert sniff(polyglot) is MediaKind.DICOM
    assert probe(polyglot, max_image_pixels=MAX_PIXELS).rows == 64


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is not an image", b'{"image": "chest.png"}', b"\x00" * 200, b"GIF89a" + b"\x00" * 200],
    ids=["empty", "text", "json", "zeros", "gif"],
)
def test_sniff_refuses_anything_else_and_says_what_is_accepted(data: bytes) -> None:
    with pytest.raises(UnsupportedMedia) as caught:
        sniff(data)
    assert {"DICOM", "PNG", "JPEG"} <= set(caught.value.message.replace(",", " ").split())
    assert caught.value.to_dict()["code"] == "unsupported_media_type"


def test_dicom_without_part10_preamble_is_unsupported() -> None:
    with pytest.raises(UnsupportedMedia):
        probe(_testdata("no_meta.dcm"), max_image_pixels=MAX_PIXELS)


# --- probe: what it reports


def test_probe_dicom_reports_header_facts() -> None:
    info = probe(_testdata("MR_small.dcm"), max_image_pixels=MAX_PIXELS)
    assert info == ImageInfo(
        format="dicom",
        rows=64,
        columns=64,
        frames=1,
        bits_stored=16,
        modality="MR",
        photometric_interpretation="MONOCHROME2",
        transfer_syntax="1.2.840.10008.1.2.1",
        sop_class="1.2.840.10008.5.1.4.1.1.4",
    )


def test_probe_png_and_jpeg_report_size_depth_and_grey_or_colour() -> None:
    png16 = probe(_png(np.zeros((30, 50), np.uint16)), max_image_pixels=MAX_PIXELS)
    assert (png16.format, png16.rows, png16.columns, png16.bits_stored) == ("png", 30, 50, 16)
    assert png16.photometric_interpretation == "MONOCHROME2"
    buffer = BytesIO()
    Image.new("RGB", (20, 10), (10, 200, 30)).save(buffer, format="JPEG")
    jpeg = probe(buffer.getvalue(), max_image_pixels=MAX_PIXELS)
    assert (jpeg.format, jpeg.rows, jpeg.columns, jpeg.frames, jpeg.bits_stored) == ("jpeg", 10, 20, 1, 8)
    assert jpeg.photometric_interpretation == "RGB"
    assert (jpeg.modality, jpeg.transfer_syntax, jpeg.sop_class) == (None, None, None)


def test_info_is_json_and_carries_no_patient_identifier() -> None:
    info = probe(_save(_mr_small()), max_image_pixels=MAX_PIXELS)
    text = json.dumps(info.to_dict())
    assert set(info.to_dict()) == {
        "format",
        "rows",
        "columns",
        "frames",
        "bits_stored",
        "modality",
        "photometric_interpretation",
        "transfer_syntax",
        "sop_class",
        "views",
        "body_part",
    }
    for identifier in ("DOE", "JANE", PATIENT_ID, "ACC-99120", "Nowhere"):
        assert identifier not in text


def test_free_text_in_a_coded_attribute_is_not_repeated() -> None:
    info = probe(_save(_mr_small(Modality=PATIENT_NAME)), max_image_pixels=MAX_PIXELS)
    assert info.modality is None


def test_pydicom_warnings_and_logs_quoting_values_stay_quiet(caplog: pytest.LogCaptureFixture) -> None:
    # A malformed UID makes pydicom warn and log the value verbatim; here the value is a patient's name.
    data = _save(_mr_small(SOPClassUID="9.9.9.9")).replace(b"9.9.9.9\x00", PATIENT_NAME.encode())
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = probe(data, max_image_pixels=MAX_PIXELS)
    assert info.sop_class is None
    assert caught == []
    assert "DOE" not in caplog.text
    # What pydicom does in its default validation mode, which protocol.media switches off.
    pydicom_config.settings.reading_validation_mode = pydicom_config.WARN
    try:
        with pytest.warns(UserWarning, match="DOE"):
            str(dcmread(BytesIO(data)).SOPClassUID)
    finally:
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


# --- probe: refusals


def test_png_signature_with_garbage_is_an_invalid_image() -> None:
    with pytest.raises(InvalidImage) as caught:
        probe(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, max_image_pixels=MAX_PIXELS)
    assert type(caught.value) is InvalidImage
    assert caught.value.to_dict() == {"code": "invalid_image", "message": caught.value.message, "retryable": False}


def test_jpeg_signature_with_garbage_is_an_invalid_image() -> None:
    with pytest.raises(InvalidImage):
        probe(b"\xff\xd8\xff" + b"\x17" * 300, max_image_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    "after_prefix",
    [b"", b"garbage" * 40, b"\x02\x00\x10\x00UI\xff\xff" + b"1.2" * 10, b"\x02\x00\x00\x00UL\x04\x00\xff\xff\xff\x7f"],
    ids=["nothing", "garbage", "meta-element-too-long", "group-length-huge"],
)
def test_dicom_prefix_followed_by_garbage_is_an_invalid_image(after_prefix: bytes) -> None:
    with pytest.raises(InvalidImage):
        probe(b"\x89PNG\r\n\x1a\n".ljust(128, b"\x00") + b"DICM" + after_prefix, max_image_pixels=MAX_PIXELS)


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm", "reportsi.dcm", "waveform_ecg.dcm"])
def test_objects_without_pixels_are_no_pixel_data(name: str) -> None:
    with pytest.raises(NoPixelData) as caught:
        probe(_testdata(name), max_image_pixels=MAX_PIXELS)
    assert caught.value.code == "no_pixel_data"
    assert caught.value.http_status == 422


def test_image_header_without_pixels_is_invalid_not_no_pixel_data() -> None:
    with pytest.raises(InvalidImage) as caught:
        probe(_save(_mr_small(PixelData=None)), max_image_pixels=MAX_PIXELS)
    assert type(caught.value) is InvalidImage
    assert "DOE" not in caught.value.message


def test_truncated_pixel_data_is_refused_at_intake() -> None:
    with pytest.raises(InvalidImage, match="truncated"):
        probe(_testdata("MR_truncated.dcm"), max_image_pixels=MAX_PIXELS)
    whole = _testdata("MR_small.dcm")
    with pytest.raises(InvalidImage, match="truncated"):
        probe(whole[:5000], max_image_pixels=MAX_PIXELS)  # pixel data spans bytes 1500-9692


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"BitsStored": 17}, "BitsStored 17 exceeds BitsAllocated 16"),
        ({"BitsAllocated": 12, "BitsStored": 12, "HighBit": 11}, "BitsAllocated 12 is not supported"),
        ({"Rows": None}, "no valid Rows"),
        ({"Columns": 0}, "no valid Columns"),
        ({"NumberOfFrames": "0"}, "no valid NumberOfFrames"),
        ({"HighBit": 7}, "HighBit 7"),
        ({"PixelRepresentation": 2}, "PixelRepresentation 2"),
        ({"PhotometricInterpretation": "HSV"}, "photometric interpretation"),
        ({"PhotometricInterpretation": "RGB"}, "SamplesPerPixel 3"),
    ],
)
def test_inconsistent_image_headers_are_invalid_images(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidImage, match=message) as caught:
        probe(_save(_mr_small(**changes)), max_image_pixels=MAX_PIXELS)
    assert PATIENT_NAME not in caught.value.message


def test_float_pixel_data_is_refused() -> None:
    dataset = _mr_small(PixelData=None, BitsAllocated=32, BitsStored=None, HighBit=None, PixelRepresentation=None)
    dataset.FloatPixelData = np.zeros(64 * 64, np.float32).tobytes()
    with pytest.raises(InvalidImage, match="float pixel data"):
        probe(_save(dataset), max_image_pixels=MAX_PIXELS)


def test_transfer_syntax_without_decoder_is_unsupported_media() -> None:
    dataset = _mr_small()
    dataset.file_meta.TransferSyntaxUID = MPEG2MPML
    dataset.PixelData = encapsulate([b"\x00\x00\x01\xb3 not really an MPEG-2 stream"])
    dataset["PixelData"].VR = "OB"
    with pytest.raises(UnsupportedMedia, match="MPEG2"):
        probe(_save(dataset), max_image_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    ("real", "claimed"),
    [
        (b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00"),
        (b"1.2.840.10008.1.2.5\x00", b"1.2.840.10008.1.2.1\x00"),
    ],
    ids=["native-claims-rle", "rle-claims-native"],
)
def test_file_meta_contradicting_the_pixel_data_is_invalid(real: bytes, claimed: bytes) -> None:
    source = _save(_mr_small()) if real.endswith(b"1\x00") else _testdata("MR_small_RLE.dcm")
    # UIDs of the same length, so the file meta stays well formed and only the claim is wrong.
    lying = source.replace(real, claimed, 1)
    assert lying != source
    with pytest.raises(InvalidImage, match="contradicts"):
        probe(lying, max_image_pixels=MAX_PIXELS)


def test_unknown_transfer_syntax_is_unsupported_media() -> None:
    data = _save(_mr_small())
    patched = data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.9.9.9\x00", 1)
    with pytest.raises(UnsupportedMedia, match="transfer syntax"):
        probe(patched, max_image_pixels=MAX_PIXELS)


def test_missing_transfer_syntax_is_invalid() -> None:
    with pytest.raises(InvalidImage, match="Transfer Syntax"):
        probe(_testdata("meta_missing_tsyntax.dcm"), max_image_pixels=MAX_PIXELS)


# --- limits, before decoding


def test_dicom_size_limit_is_checked_on_the_header() -> None:
    data = _testdata("MR_small.dcm")
    assert probe(data, max_image_pixels=64 * 64).rows == 64
    with pytest.raises(ImageTooLarge) as caught:
        probe(data, max_image_pixels=64 * 64 - 1)
    assert caught.value.http_status == 413


def test_dicom_frames_count_towards_the_limit() -> None:
    with pytest.raises(ImageTooLarge, match="2 frame"):
        probe(_save(_mr_small(NumberOfFrames=2)), max_image_pixels=64 * 64 + 1)


def test_a_huge_claimed_dicom_is_too_large_before_its_short_pixels_are_looked_at() -> None:
    with pytest.raises(ImageTooLarge):
        probe(_save(_mr_small(Rows=60000, Columns=60000)), max_image_pixels=MAX_PIXELS)


def test_png_size_limit_and_pillow_bomb_guard_are_image_too_large() -> None:
    with pytest.raises(ImageTooLarge):
        probe(_png_header_only(20000, 20000), max_image_pixels=MAX_PIXELS)
    # Past Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS) even when our limit is generous:
    with pytest.raises(ImageTooLarge, match="decompression-bomb"):
        probe(_png_header_only(50000, 50000), max_image_pixels=10**12)
    # Between Pillow's warning and error thresholds, its warning is a refusal too:
    with pytest.raises(ImageTooLarge, match="decompression-bomb"):
        probe(_png_header_only(10000, 10000), max_image_pixels=10**12)


def test_deflated_dicom_that_inflates_past_the_limit_is_too_large() -> None:
    dataset = _mr_small()
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    honest = _save(dataset)
    assert probe(honest, max_image_pixels=MAX_PIXELS).transfer_syntax == str(DeflatedExplicitVRLittleEndian)
    (group_length,) = struct.unpack_from("<I", honest, 140)  # (0002,0000) UL: tag, VR, length, then the value
    meta = honest[: 144 + group_length]
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(b"\x00" * (8 << 20)) + deflater.flush()
    assert len(bomb) < 20_000
    with pytest.raises(ImageTooLarge, match="inflates"):
        probe(meta + bomb, max_image_pixels=1000)


# --- views, body part and fitness for a model


def test_probe_reports_view_and_body_part_in_view_position_terms() -> None:
    dataset = _mr_small(ViewPosition="pa", BodyPartExamined="Chest")
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399348003", "SCT", "antero-posterior"
    dataset.ViewCodeSequence = [code]
    info = probe(_save(dataset), max_image_pixels=MAX_PIXELS)
    assert (info.views, info.body_part) == (("PA", "AP"), "CHEST")
    assert json.loads(json.dumps(info.to_dict()))["views"] == ["PA", "AP"]


def test_free_text_in_view_or_body_part_is_not_repeated() -> None:
    info = probe(
        _save(_mr_small(ViewPosition=PATIENT_NAME, BodyPartExamined="Mrs Doe's chest")), max_image_pixels=MAX_PIXELS
    )
    assert (info.views, info.body_part) == ((), None)


def test_check_fits_accepts_silence_and_refuses_what_the_model_does_not_take() -> None:
    frontal = ImageInput(height=8, width=8, views=("PA", "AP"), body_parts=("CHEST",))
    silent = probe(_save(_mr_small()), max_image_pixels=MAX_PIXELS)
    check_fits(silent, frontal)
    check_fits(replace(silent, views=("AP",), body_part="CHEST"), frontal)
    check_fits(replace(silent, views=("LL",), body_part="SKULL"), ImageInput(height=8, width=8))
    with pytest.raises(UnsupportedView, match="LL"):
        check_fits(replace(silent, views=("PA", "LL")), frontal)
    with pytest.raises(UnsupportedView, match="ABDOMEN"):
        check_fits(replace(silent, body_part="ABDOMEN"), frontal)


def test_png_sbit_becomes_bits_stored_only_when_it_is_below_the_depth() -> None:
    def with_sbit(png: bytes, bits: int) -> bytes:
        chunk = struct.pack(">I", 1) + b"sBIT" + bytes([bits]) + struct.pack(">I", zlib.crc32(b"sBIT" + bytes([bits])))
        return png[:33] + chunk + png[33:]  # after the signature (8) and IHDR (25)

    png16 = _png(np.zeros((4, 4), np.uint16))
    assert probe(with_sbit(png16, 12), max_image_pixels=MAX_PIXELS).bits_stored == 12
    assert probe(with_sbit(png16, 16), max_image_pixels=MAX_PIXELS).bits_stored == 16
    assert probe(with_sbit(png16, 0), max_image_pixels=MAX_PIXELS).bits_stored == 16
    rgb = _png(np.zeros((4, 4, 3), np.uint8))
    assert probe(with_sbit(rgb, 5), max_image_pixels=MAX_PIXELS).bits_stored == 8  # only a grey PNG's is used


def test_open_dicom_hands_on_the_dataset_with_its_pixels_still_on_the_bytes() -> None:
    data = _testdata("MR_small.dcm")
    info, dataset = open_dicom(data, max_image_pixels=MAX_PIXELS)
    assert info == probe(data, max_image_pixels=MAX_PIXELS)
    assert dataset.get_item(0x7FE00010, keep_deferred=True).value is None  # deferred, not read yet
    assert len(dataset.PixelData) == 64 * 64 * 2
    with pytest.raises(UnsupportedMedia):
        open_dicom(_png(np.zeros((2, 2), np.uint8)), max_image_pixels=MAX_PIXELS)


# --- where the pixel data lies in the upload, and a PNG's chunks


def test_unread_pixel_data_is_found_at_its_offset_in_the_upload() -> None:
    dataset = _mr_small()
    data = _save(dataset)
    _, probed = open_dicom(data, max_image_pixels=MAX_PIXELS)
    offset = unread_pixel_data_offset(probed)
    assert offset is not None
    pixels = dataset.PixelData
    assert data[offset : offset + len(pixels)] == pixels
    assert probed.PixelData == pixels  # read now: no longer on the upload alone
    assert unread_pixel_data_offset(probed) is None


def test_a_deflated_dataset_gives_no_offset_in_the_upload() -> None:
    dataset = _mr_small()
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    _, probed = open_dicom(_save(dataset), max_image_pixels=MAX_PIXELS)
    assert unread_pixel_data_offset(probed) is None  # its offsets count in the inflated body


def test_png_chunks_are_walked_in_order_and_a_cut_last_body_comes_short() -> None:
    buffer = BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(buffer, format="PNG")
    data = buffer.getvalue()
    kinds = [kind for kind, _ in png_chunks(data)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    image_data = b"".join(body for kind, body in png_chunks(data) if kind == b"IDAT")
    assert len(zlib.decompress(image_data)) == 64 * (1 + 64 * 2)  # a filter byte and 64 16-bit samples a row
    *_, (kind, body) = png_chunks(data[:-20])
    assert kind == b"IDAT" and len(body) < len(image_data)
