"""What an upload is, read from its header alone: the kind of media and the size of the image.

`probe` runs at intake (the HTTP API) and again in the worker before any pixel is decoded, so that a bad upload
is refused with a 4xx at once and an oversized one never reaches a decoder:

    sniff(data)            magic bytes -> MediaKind, or UnsupportedMedia
    probe(data)            header only -> ImageInfo, or UnsupportedMedia / InvalidImage / NoPixelData /
                           ImageTooLarge / NotForPresentation
    open_dicom(data)       probe's checks, and the dataset they read (pixel data left on the bytes, read later)
    open_raster(data)      probe's checks, and the opened Pillow image (not decoded yet)
    check_fits(info, spec) the view and body part the header states against the model's; UnsupportedView

The worker reads each upload once: `open_dicom` / `open_raster` hand the parsed header on to the decoder. The
rules (For Processing refused, views, PNG sBIT) are described in docs/x-ray-input.md.

`ImageInfo` carries what a result may repeat about an image (PS3.3 attributes that identify no one); patient
attributes are never read into it. pydicom and Pillow are called inside `third_party_boundary`, which keeps their
warnings quiet (pydicom's may quote element values, i.e. patient data) and turns their exceptions into
`InvalidImage` whose message names the exception type only.

Warnings are kept quiet without `warnings.catch_warnings`, which swaps the process-wide filter list and so is not
thread-safe (the API probes uploads in a thread pool, a worker decodes in threads): pydicom is told once not to
warn about invalid values at all, Pillow's decompression-bomb warning is an error once for the whole process, and
a warning raised by a thread inside the boundary is dropped by hooks installed once (`warnings.showwarning`,
and a filter on the `py.warnings` logger for processes that route warnings to logging, as Celery does).
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from io import BytesIO
from typing import Any

from PIL import Image
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from inferq.protocol.bare_images import PNG_SIGNATURE, kind_of
from inferq.protocol.errors import (
    ImageTooLarge,
    InferqError,
    InvalidImage,
    NoPixelData,
    NotForPresentation,
    UnsupportedMedia,
    UnsupportedView,
)
from inferq.protocol.registry import ImageInput

# pydicom logs invalid element values verbatim at WARNING (e.g. "Invalid value for VR UI: '...'"), and element
# values are patient data that must not reach our logs; its errors still get through.
logging.getLogger("pydicom").setLevel(logging.ERROR)
# Invalid values are pydicom's most common warning, and its message quotes the value: do not make them at all.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

_boundary = threading.local()


def _inside_boundary() -> bool:
    return getattr(_boundary, "depth", 0) > 0


def _install_warning_hooks() -> None:
    """Drop warnings raised by a thread inside `third_party_boundary`; installed once, so thread-safe."""
    shown = warnings.showwarning
    if getattr(shown, "_inferq_quiet", False):
        return

    def showwarning(*args: Any, **kwargs: Any) -> None:
        if not _inside_boundary():
            shown(*args, **kwargs)

    showwarning._inferq_quiet = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning
    logging.getLogger("py.warnings").addFilter(lambda _record: not _inside_boundary())


__all__ = [
    "ACCEPTED_MEDIA",
    "SUPPORTED_PHOTOMETRICS",
    "ImageInfo",
    "MediaKind",
    "check_fits",
    "open_dicom",
    "open_raster",
    "png_chunks",
    "probe",
    "sniff",
    "third_party_boundary",
    "unread_pixel_data_offset",
]

ACCEPTED_MEDIA = "DICOM Part 10 (128-byte preamble, then 'DICM'), PNG or JPEG"
# Each photometric interpretation with its samples per pixel (PS3.3 C.7.6.3.1.2).
SUPPORTED_PHOTOMETRICS: dict[str, int] = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_RCT": 3,
    "YBR_ICT": 3,
}

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009)  # Float / Double Float Pixel Data: parametric maps
_SUPPORTED_BITS_ALLOCATED = (1, 8, 16, 32)
# Values larger than this stay on disk while the header is probed: the pixel data is never copied.
_DEFER_BYTES = 4096
# A deflated dataset may inflate to at most this many bytes per allowed pixel (3 samples of 16 bits) plus
# room for the header, so a zip bomb is stopped before pydicom inflates it whole.
_INFLATED_BYTES_PER_PIXEL = 6
_INFLATED_HEADER_BYTES = 1 << 20
_INFLATE_STEP_BYTES = 1 << 20
_UNDEFINED_LENGTH = 0xFFFFFFFF
_MODALITY_PATTERN = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # a CS value (PS3.5 6.2): nothing else is repeated
# Raw detector data, which PS3.3 C.8.11.1.1.1 says is not for display: the For Processing SOP classes.
_FOR_PROCESSING_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.501.2.2",  # DICOS Digital X-Ray Image Storage - For Processing
    }
)
# View Code Sequence codes (CID 4010, SNOMED CT and the older SNOMED RT ids) in View Position's terms.
_VIEW_BY_CODE = {
    "272479007": "PA",
    "R-10214": "PA",
    "R-40888": "PA",
    "399348003": "AP",
    "R-10206": "AP",
    "399173006": "LL",
    "R-10236": "LL",
    "399198007": "RL",
    "R-10232": "RL",
    "399067008": "LATERAL",
    "R-102CD": "LATERAL",
}
_VIEW_BY_MEANING = {
    "POSTERO-ANTERIOR": "PA",
    "ANTERO-POSTERIOR": "AP",
    "LEFT LATERAL": "LL",
    "RIGHT LATERAL": "RL",
    "LATERAL": "LATERAL",
}
_UNKNOWN_VIEW = "UNRECOGNISED"
_PNG_CHUNK_HEADER_BYTES = 8
_PNG_GREY = 0  # IHDR colour type of a greyscale PNG: its sBIT chunk holds one byte
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
# Pillow modes in DICOM's words, so results describe every kind of image alike.
_PHOTOMETRIC_BY_PILLOW_MODE = {
    "1": "MONOCHROME2",
    "L": "MONOCHROME2",
    "LA": "MONOCHROME2",
    "I": "MONOCHROME2",
    "I;16": "MONOCHROME2",
    "I;16B": "MONOCHROME2",
    "I;16L": "MONOCHROME2",
    "I;16N": "MONOCHROME2",
    "F": "MONOCHROME2",
    "P": "PALETTE COLOR",
    "PA": "PALETTE COLOR",
    "RGB": "RGB",
    "RGBA": "RGB",
    "YCbCr": "YBR_FULL",
}


class MediaKind(StrEnum):
    """The accepted kinds of upload."""

    DICOM = "dicom"
    PNG = "png"
    JPEG = "jpeg"


@dataclass(frozen=True)
class ImageInfo:
    """What may be said about an image without identifying anyone; rows and columns are as stored."""

    format: str
    rows: int
    columns: int
    frames: int
    bits_stored: int | None
    modality: str | None
    photometric_interpretation: str
    transfer_syntax: str | None
    sop_class: str | None
    # View Position and View Code Sequence in View Position's terms; Body Part Examined. Empty where unsaid.
    views: tuple[str, ...] = ()
    body_part: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sniff(data: bytes) -> MediaKind:
    """The kind of upload from its magic bytes (`bare_images.kind_of`)."""
    kind = kind_of(data)
    if kind is not None:
        return MediaKind(kind)
    raise UnsupportedMedia(f"the upload ({len(data)} bytes) is not an accepted image; accepted: {ACCEPTED_MEDIA}")


def probe(data: bytes, *, max_image_pixels: int) -> ImageInfo:
    """Validate the header and the size limit without decoding a pixel."""
    kind = sniff(data)
    if kind is MediaKind.DICOM:
        return open_dicom(data, max_image_pixels=max_image_pixels)[0]
    info, image = open_raster(data, max_image_pixels=max_image_pixels)
    image.close()
    return info


def open_dicom(data: bytes, *, max_image_pixels: int) -> tuple[ImageInfo, Dataset]:
    """`probe` for DICOM, returning the dataset it read; its pixel data is read from `data` on first access."""
    if sniff(data) is not MediaKind.DICOM:
        raise UnsupportedMedia("expected a DICOM file")
    return _probe_dicom(data, max_image_pixels)


def open_raster(data: bytes, *, max_image_pixels: int) -> tuple[ImageInfo, Image.Image]:
    """`probe` for PNG and JPEG, returning the opened image (header read, pixels not decoded); the caller closes
    it. Decoding it must run inside `third_party_boundary`."""
    kind = sniff(data)
    if kind is MediaKind.DICOM:
        raise UnsupportedMedia("expected a PNG or JPEG file, got dicom")
    with third_party_boundary(f"{kind.value.upper()} header"):
        image = Image.open(BytesIO(data), formats=[_PILLOW_FORMATS[kind]])
        try:
            info = _raster_info(data, kind, image)
            _check_pixel_count(info.rows, info.columns, info.frames, max_image_pixels)
        except BaseException:
            image.close()
            raise
    return info, image


def check_fits(info: ImageInfo, spec: ImageInput) -> None:
    """Refuse an image whose header names a view or body part the model does not take; silence is accepted."""
    accepted_views = {view.strip().upper() for view in spec.views}
    refused = [view for view in info.views if view not in accepted_views]
    if accepted_views and refused:
        raise UnsupportedView(
            f"the image is a {'/'.join(refused)} view; this model reads {', '.join(sorted(accepted_views))} only"
        )
    accepted_parts = {part.strip().upper() for part in spec.body_parts}
    if accepted_parts and info.body_part is not None and info.body_part not in accepted_parts:
        raise UnsupportedView(
            f"the image shows the {info.body_part}; this model reads {', '.join(sorted(accepted_parts))} only"
        )


@contextmanager
def third_party_boundary(what: str) -> Iterator[None]:
    """Run pydicom or Pillow code: warnings stay quiet, exceptions become `InvalidImage` (or `ImageTooLarge`).

    Our own errors pass through; so do MemoryError (not the client's fault) and interpreter exits. The message
    names only the exception type: pydicom messages may quote element values. Only this thread's warnings are
    silenced; threads beside it are unaffected.
    """
    _boundary.depth = getattr(_boundary, "depth", 0) + 1
    try:
        yield
    except (InferqError, MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"the {what} exceeds the decoder's decompression-bomb limit") from e
    except BaseException as e:  # a Rust decoder's panic (pylibjpeg-rle) is a BaseException, not an Exception
        raise InvalidImage(f"cannot read the {what}: damaged, truncated or unsupported ({type(e).__name__})") from e
    finally:
        _boundary.depth -= 1


_install_warning_hooks()


def _check_pixel_count(rows: int, columns: int, frames: int, max_image_pixels: int) -> None:
    pixel_count = rows * columns * frames
    if pixel_count > max_image_pixels:
        raise ImageTooLarge(
            f"the image has {rows} x {columns} pixels x {frames} frame(s) = {pixel_count}, "
            f"more than the {max_image_pixels} allowed"
        )


# --- PNG and JPEG


def _raster_info(data: bytes, kind: MediaKind, image: Image.Image) -> ImageInfo:
    columns, rows = image.size
    return ImageInfo(
        format=kind.value,
        rows=rows,
        columns=columns,
        frames=int(getattr(image, "n_frames", 1)),
        bits_stored=_raster_bits(data, kind, image),
        modality=None,
        photometric_interpretation=_PHOTOMETRIC_BY_PILLOW_MODE.get(image.mode, image.mode),
        transfer_syntax=None,
        sop_class=None,
    )


def _raster_bits(data: bytes, kind: MediaKind, image: Image.Image) -> int | None:
    """The bits a sample holds: a grey PNG's sBIT when it has one, else its IHDR depth; a JPEG's precision."""
    if kind is MediaKind.PNG:
        depth = data[24]  # IHDR bit depth: signature (8), chunk length and type (8), width and height (8)
        significant = _png_significant_bits(data) if data[25] == _PNG_GREY else None
        return significant if significant is not None and 0 < significant < depth else depth
    bits = getattr(image, "bits", None)  # the JPEG frame header's sample precision
    return int(bits) if isinstance(bits, int) else None


def _png_significant_bits(data: bytes) -> int | None:
    """A PNG's sBIT value for its grey channel (PNG 11.3.3.4), which must come before the first IDAT; Pillow
    does not report it. 12-bit detector data is often written into a 16-bit PNG with sBIT 12."""
    for kind, body in png_chunks(data):
        if kind == b"IDAT":
            return None
        if kind == b"sBIT" and body:
            return body[0]
    return None


def png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, body) of each chunk of a PNG, in order, as far as the data holds them (a truncated last body is cut
    short); CRCs are not checked."""
    offset = len(PNG_SIGNATURE)
    while offset + _PNG_CHUNK_HEADER_BYTES <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        body_at = offset + _PNG_CHUNK_HEADER_BYTES
        yield data[offset + 4 : body_at], data[body_at : body_at + length]
        offset = body_at + length + 4  # past the body and its CRC


# --- DICOM


def _probe_dicom(data: bytes, max_image_pixels: int) -> tuple[ImageInfo, Dataset]:
    # pydicom converts values lazily, on first access: every access may raise or warn, so all run in the boundary.
    with third_party_boundary("DICOM header"):
        dataset = _read_dicom_header(data, max_image_pixels)
        _require_pixel_data(dataset)
        _require_for_presentation(dataset)
        rows, columns, frames = _geometry(dataset)
        _check_pixel_count(rows, columns, frames, max_image_pixels)
        _check_bits(dataset)
        photometric = _check_photometric(dataset)
        transfer_syntax = _check_transfer_syntax(dataset)
        _check_pixel_length(dataset, data, transfer_syntax, frames)
        info = ImageInfo(
            format=MediaKind.DICOM.value,
            rows=rows,
            columns=columns,
            frames=frames,
            bits_stored=int(dataset.BitsStored),
            modality=_clean_modality(dataset.get("Modality")),
            photometric_interpretation=photometric,
            transfer_syntax=str(transfer_syntax),
            sop_class=_clean_uid(dataset.get("SOPClassUID")),
            views=_views(dataset),
            body_part=_clean_code_string(dataset.get("BodyPartExamined")),
        )
    return info, dataset


def _read_dicom_header(data: bytes, max_image_pixels: int) -> Dataset:
    """The dataset with its large values (the pixel data) left unread; a deflated one is inflated with a bound."""
    stream = BytesIO(data)
    read_preamble(stream, False)
    file_meta = _read_file_meta_info(stream)  # pydicom has no public reader of the meta alone from bytes
    transfer_syntax = file_meta.get("TransferSyntaxUID")
    if not transfer_syntax:
        raise InvalidImage("the DICOM file meta has no Transfer Syntax UID")
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        limit_bytes = max_image_pixels * _INFLATED_BYTES_PER_PIXEL + _INFLATED_HEADER_BYTES
        _check_inflated_size(data[stream.tell() :], limit_bytes)
    return dcmread(BytesIO(data), defer_size=_DEFER_BYTES)


def _check_inflated_size(deflated: bytes, limit_bytes: int) -> None:
    """Count the inflated size in small steps, keeping none of it: the check itself never holds the whole."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, inflated_bytes = deflated, 0
    try:
        while not inflater.eof and inflated_bytes <= limit_bytes:
            step = inflater.decompress(pending, _INFLATE_STEP_BYTES)
            pending = inflater.unconsumed_tail
            if not step and not pending:
                break
            inflated_bytes += len(step)
    except zlib.error as e:
        raise InvalidImage("the deflated DICOM dataset is damaged") from e
    if inflated_bytes > limit_bytes:
        raise ImageTooLarge(f"the deflated DICOM dataset inflates to more than {limit_bytes} bytes")


def _require_pixel_data(dataset: Dataset) -> None:
    if any(tag in dataset for tag in _FLOAT_PIXEL_DATA_TAGS):
        raise InvalidImage("float pixel data (a parametric map) is not supported; send an X-ray image")
    if _PIXEL_DATA in dataset:
        return
    sop_class = _clean_uid(dataset.get("SOPClassUID"))
    name = UID(sop_class).name if sop_class else "an unidentified object"
    if "Image Storage" in name or "Rows" in dataset:
        raise InvalidImage(f"the DICOM image ({name}) has a header but no pixel data: truncated, or pixels stripped")
    raise NoPixelData(f"the DICOM object is {name}, which has no pixel data to read")


def _require_for_presentation(dataset: Dataset) -> None:
    """Refuse raw detector data: a For Processing SOP class, or Presentation Intent Type FOR PROCESSING."""
    sop_class = _clean_uid(dataset.get("SOPClassUID"))
    if sop_class is None and "file_meta" in dataset.__dict__:
        sop_class = _clean_uid(dataset.file_meta.get("MediaStorageSOPClassUID"))
    intent = str(dataset.get("PresentationIntentType") or "").strip().upper()
    if sop_class in _FOR_PROCESSING_SOP_CLASSES or intent == "FOR PROCESSING":
        raise NotForPresentation(
            "the image is 'For Processing' raw detector data, which is not meant to be looked at; "
            "send the 'For Presentation' image the modality made from it"
        )


def _views(dataset: Dataset) -> tuple[str, ...]:
    """What the header says of the view: View Position, then each View Code Sequence item (empty when silent)."""
    views = []
    position = _clean_code_string(dataset.get("ViewPosition"))
    if position is not None:
        views.append(position)
    for item in dataset.get("ViewCodeSequence") or []:
        views.append(_view_from_code(item))
    return tuple(dict.fromkeys(views))


def _view_from_code(item: Dataset) -> str:
    code = str(item.get("CodeValue") or item.get("LongCodeValue") or "").strip().upper()
    if code in _VIEW_BY_CODE:
        return _VIEW_BY_CODE[code]
    meaning = str(item.get("CodeMeaning") or "").strip().upper()
    return _VIEW_BY_MEANING.get(meaning, _UNKNOWN_VIEW)


def _geometry(dataset: Dataset) -> tuple[int, int, int]:
    rows = _positive_int(dataset, "Rows", default=None)
    columns = _positive_int(dataset, "Columns", default=None)
    frames = _positive_int(dataset, "NumberOfFrames", default=1)
    return rows, columns, frames


def _positive_int(dataset: Dataset, keyword: str, *, default: int | None) -> int:
    value = dataset.get(keyword)
    if value in (None, "") and default is not None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise InvalidImage(f"the DICOM header has no valid {keyword} (a positive whole number is required)")
    return number


def _check_bits(dataset: Dataset) -> None:
    bits_allocated = _positive_int(dataset, "BitsAllocated", default=None)
    bits_stored = _positive_int(dataset, "BitsStored", default=None)
    if bits_allocated not in _SUPPORTED_BITS_ALLOCATED:
        raise InvalidImage(f"BitsAllocated {bits_allocated} is not supported (accepted: {_SUPPORTED_BITS_ALLOCATED})")
    if bits_stored > bits_allocated:
        raise InvalidImage(f"BitsStored {bits_stored} exceeds BitsAllocated {bits_allocated}")
    high_bit = dataset.get("HighBit")
    representation = dataset.get("PixelRepresentation", 0)
    # Decoders read the stored bits from the bottom up; another High Bit would put them elsewhere.
    if high_bit not in (None, "") and high_bit != bits_stored - 1:
        raise InvalidImage(f"HighBit {high_bit} is not BitsStored - 1 ({bits_stored - 1})")
    if representation not in (0, 1):
        raise InvalidImage(f"PixelRepresentation {representation} is neither 0 (unsigned) nor 1 (signed)")


def _check_photometric(dataset: Dataset) -> str:
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    samples = dataset.get("SamplesPerPixel", 1)
    if photometric not in SUPPORTED_PHOTOMETRICS:
        raise InvalidImage(f"the photometric interpretation is not one of {sorted(SUPPORTED_PHOTOMETRICS)}")
    if samples != SUPPORTED_PHOTOMETRICS[photometric]:
        raise InvalidImage(f"{photometric} needs SamplesPerPixel {SUPPORTED_PHOTOMETRICS[photometric]}")
    return photometric


def _check_transfer_syntax(dataset: Dataset) -> UID:
    transfer_syntax = UID(str(dataset.file_meta.TransferSyntaxUID).strip())
    if not transfer_syntax.is_valid:
        raise InvalidImage("the Transfer Syntax UID of the file meta is not a valid UID")
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise UnsupportedMedia(f"DICOM transfer syntax {transfer_syntax} ({transfer_syntax.name}) is not supported")
    return transfer_syntax


def _check_pixel_length(dataset: Dataset, data: bytes, transfer_syntax: UID, frames: int) -> None:
    """Refuse pixel data whose encoding contradicts the transfer syntax, or uncompressed pixel data shorter than
    Rows x Columns x frames needs (a truncated upload)."""
    element = dataset.get_item(_PIXEL_DATA, keep_deferred=True)
    if not isinstance(element, RawDataElement):
        return
    encapsulated = element.length == _UNDEFINED_LENGTH
    if encapsulated != transfer_syntax.is_encapsulated:
        state = "is" if encapsulated else "is not"
        raise InvalidImage(f"the pixel data {state} compressed, which contradicts transfer syntax {transfer_syntax}")
    if encapsulated:
        return
    expected_bytes = int(get_expected_length(dataset, unit="bytes"))
    available_bytes = element.length
    offset = unread_pixel_data_offset(dataset)
    if element.value is not None:
        available_bytes = min(available_bytes, len(element.value))
    elif offset is not None:  # else deflated: zlib already checked the inflated size
        available_bytes = min(available_bytes, len(data) - offset)
    if available_bytes < expected_bytes:
        raise InvalidImage(
            f"the pixel data holds {available_bytes} bytes but {frames} frame(s) need {expected_bytes}: "
            "the file is truncated or its header is wrong"
        )


def unread_pixel_data_offset(dataset: Dataset) -> int | None:
    """Where the pixel data's value starts in the upload `open_dicom` read `dataset` from, while the probe has
    left it unread (larger than `_DEFER_BYTES`); None once read, or in a deflated dataset, whose offsets count
    in the inflated body rather than the upload."""
    element = dataset.get_item(_PIXEL_DATA, keep_deferred=True)
    if not isinstance(element, RawDataElement) or element.value is not None:
        return None
    if dataset.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        return None
    return int(element.value_tell)


def _clean_modality(value: object) -> str | None:
    return _clean_code_string(value)


def _clean_code_string(value: object) -> str | None:
    """A CS value as it may be repeated (upper case, CS characters only); None when absent or free text."""
    text = str(value or "").strip().upper()
    return text if _MODALITY_PATTERN.match(text) else None


def _clean_uid(value: object) -> str | None:
    uid = UID(str(value or "").strip())
    return str(uid) if uid and uid.is_valid else None
