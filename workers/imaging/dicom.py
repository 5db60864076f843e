"""Read a DICOM image the way a viewer presents it (X-RAY-INPUT.md; PS3.3 C.7.6.3, C.11).

    decode frame 0 -> Modality LUT (LUT Sequence, else Rescale Slope/Intercept)
                   -> VOI (VOI LUT Sequence, else the first Window, else the stored range)
                   -> invert for MONOCHROME1 or Presentation LUT Shape INVERSE
                   -> Pixel Padding Value pixels to black
    colour (RGB, YBR_*, PALETTE COLOR) -> BT.601 luma

Every step's output range comes from the header, never from the pixels, so the picture is scaled the same way
whatever the image holds: no per-image min/max, no percentiles that would hide collimation. The VOI step is
written here rather than taken from `pydicom.pixels.apply_voi_lut`: pydicom's window outputs the *input's*
range (which a rescale can make negative or reversed) and its LUT lookup truncates float input, while ours
outputs exactly [0, 1]. A Presentation LUT Sequence in an image is not applied (viewers differ; it is rare).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, as_pixel_options, get_decoder
from pydicom.uid import RLELossless

from protocol.errors import InvalidImage, UnsupportedMedia
from protocol.media import ImageInfo, MediaKind, probe, third_party_boundary
from workers.imaging.present import Picture, luma, make_picture

__all__ = ["read_dicom"]

# Pinned where available so a lossy frame decodes to the same values whatever other plugins are installed.
_PREFERRED_PLUGIN = "pylibjpeg"
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ: the start of a JPEG 2000 codestream
_J2K_SEARCH_BYTES = 65536  # a JP2 header may wrap the codestream
# JPEG frame headers (SOFn, less DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55.
_JPEG_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_MAX_LUT_BITS = 16


def read_dicom(data: bytes, *, max_image_pixels: int) -> Picture:
    """The presented first frame of a DICOM Part 10 upload; every failure is an `InvalidImage` (or subclass)."""
    info = probe(data, max_image_pixels=max_image_pixels)
    if info.format != MediaKind.DICOM:
        raise UnsupportedMedia(f"expected a DICOM file, got {info.format}")
    with third_party_boundary("DICOM image"):
        dataset = dcmread(BytesIO(data))
        _check_codestream_size(dataset, info)
        decoded, photometric = _decode_first_frame(dataset)
        grey = _present(decoded, photometric, dataset)
    return make_picture(grey, info)


def _decode_first_frame(dataset: Dataset) -> tuple[np.ndarray, str]:
    """Frame 0 on purpose: a multi-frame X-ray's frames are separate exposures, and averaging them would blur.

    Returns the stored values and the photometric interpretation *after* decoding: pydicom turns YBR_FULL(_422)
    into RGB, and the JPEG 2000 decoder undoes YBR_RCT / YBR_ICT.
    """
    decoder = get_decoder(dataset.file_meta.TransferSyntaxUID)
    plugin = _PREFERRED_PLUGIN if _PREFERRED_PLUGIN in decoder.available_plugins else ""
    options = as_pixel_options(dataset)
    array, properties = decoder.as_array(dataset, index=0, validate=True, raw=False, decoding_plugin=plugin, **options)
    return array, str(properties["photometric_interpretation"])


def _present(decoded: np.ndarray, photometric: str, dataset: Dataset) -> np.ndarray:
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return _present_monochrome(decoded, photometric, dataset)
    return _colour_to_grey(decoded, photometric, dataset)


# --- guarding the decoder


def _check_codestream_size(dataset: Dataset, info: ImageInfo) -> None:
    """A JPEG or JPEG 2000 frame declares its own size, and the decoder allocates by it, not by Rows x Columns:
    refuse a frame larger than the header (checked against `max_image_pixels`) says, before decoding it."""
    transfer_syntax = dataset.file_meta.TransferSyntaxUID
    if not transfer_syntax.is_encapsulated or transfer_syntax == RLELossless:
        return
    frame = get_frame(dataset.PixelData, 0, number_of_frames=info.frames, extended_offsets=_extended_offsets(dataset))
    size = _codestream_size(frame)
    if size is not None and size[0] * size[1] > info.rows * info.columns:
        raise InvalidImage(
            f"the compressed frame is {size[0]} x {size[1]} pixels but the header says {info.rows} x {info.columns}"
        )


def _extended_offsets(dataset: Dataset) -> tuple[bytes, bytes] | None:
    offsets = dataset.get("ExtendedOffsetTable")
    lengths = dataset.get("ExtendedOffsetTableLengths")
    return (offsets, lengths) if offsets and lengths else None


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG 2000 SIZ or a JPEG / JPEG-LS frame header; None when neither is found."""
    start = frame.find(_J2K_SIZ, 0, _J2K_SEARCH_BYTES)
    if start >= 0 and start + 24 <= len(frame):
        # SOC (2), SIZ (2), Lsiz (2), Rsiz (2), then Xsiz, Ysiz, XOsiz, YOsiz (4 each)
        x_size, y_size, x_offset, y_offset = struct.unpack_from(">4I", frame, start + 8)
        return y_size - y_offset, x_size - x_offset
    if frame.startswith(b"\xff\xd8"):
        return _jpeg_size(frame)
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    offset = 2  # after SOI
    while offset + 4 <= len(frame):
        if frame[offset] != 0xFF:
            return None
        marker = frame[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in _JPEG_SOF_MARKERS and offset + 9 <= len(frame):
            height, width = struct.unpack_from(">HH", frame, offset + 5)  # after length (2) and precision (1)
            return height, width
        offset += 2 + int.from_bytes(frame[offset + 2 : offset + 4], "big")
    return None


# --- grey images: modality, VOI, presentation


def _present_monochrome(stored: np.ndarray, photometric: str, dataset: Dataset) -> np.ndarray:
    values, values_range = _apply_modality(stored, dataset)
    picture = _apply_voi(values, values_range, dataset)
    # The DX module pairs MONOCHROME1 with INVERSE: both say the same thing, so they invert once, not twice.
    if photometric == "MONOCHROME1" or _presentation_shape(dataset) == "INVERSE":
        picture = 1.0 - picture
    padding = _padding_mask(stored, dataset)
    return picture if padding is None else np.where(padding, 0.0, picture)


def _apply_modality(stored: np.ndarray, dataset: Dataset) -> tuple[np.ndarray, tuple[float, float]]:
    """Modality values and the range they can take for this header's stored range."""
    low, high = _stored_range(dataset)
    item = _first_item(dataset, "ModalityLUTSequence")
    if item is not None:
        lut = _Lut.from_item(item, dataset)
        return lut.apply(stored), lut.output_range_for(low, high)
    slope = _number_or(dataset.get("RescaleSlope"), 1.0)
    intercept = _number_or(dataset.get("RescaleIntercept"), 0.0)
    if slope == 0:
        raise InvalidImage("Rescale Slope is 0: every pixel would be the same")
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return stored.astype(np.float64) * slope + intercept, (ends[0], ends[1])


def _stored_range(dataset: Dataset) -> tuple[int, int]:
    """Smallest/Largest Image Pixel Value when they are sane, else all that BitsStored can hold."""
    bits_stored = int(dataset.BitsStored)
    if dataset.get("PixelRepresentation", 0) == 1:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        low, high = 0, (1 << bits_stored) - 1
    smallest = _first_number(dataset.get("SmallestImagePixelValue"))
    largest = _first_number(dataset.get("LargestImagePixelValue"))
    if smallest is not None and largest is not None and low <= smallest < largest <= high:
        return int(smallest), int(largest)
    return low, high


def _apply_voi(values: np.ndarray, values_range: tuple[float, float], dataset: Dataset) -> np.ndarray:
    """The VOI step scaled by its own output range to [0, 1]."""
    item = _first_item(dataset, "VOILUTSequence")
    if item is not None and "LUTDescriptor" in item and "LUTData" in item:
        lut = _Lut.from_item(item, dataset)
        return lut.apply(values) / lut.output_max
    center = _first_number(dataset.get("WindowCenter"))
    width = _first_number(dataset.get("WindowWidth"))
    if center is not None and width is not None:
        function = str(dataset.get("VOILUTFunction") or "LINEAR").strip().upper()
        return _apply_window(values, center=center, width=width, function=function)
    low, high = values_range
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _apply_window(values: np.ndarray, *, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 and C.11.2.1.3 with the output range set to [0, 1]."""
    if function not in _VOI_FUNCTIONS:
        raise InvalidImage(f"the VOI LUT Function is none of {', '.join(_VOI_FUNCTIONS)}")
    if function == "LINEAR":
        if width < 1:
            raise InvalidImage(f"a LINEAR window needs Window Width >= 1, got {width}")
        if width == 1:  # the formula degenerates to a threshold at center - 0.5
            return (values > center - 0.5).astype(np.float64)
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if width <= 0:
        raise InvalidImage(f"a {function} window needs Window Width > 0, got {width}")
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    # SIGMOID 1 / (1 + exp(-4 (x - c) / w)), written with tanh, which cannot overflow.
    return 0.5 * (1.0 + np.tanh(2.0 * (values - center) / width))


def _presentation_shape(dataset: Dataset) -> str:
    return str(dataset.get("PresentationLUTShape") or "").strip().upper()


def _padding_mask(stored: np.ndarray, dataset: Dataset) -> np.ndarray | None:
    """Pixels outside the exposure (PS3.3 C.7.5.1.1.2), given as stored values; None when there are none."""
    value = _padding_value(dataset, "PixelPaddingValue")
    if value is None:
        return None
    limit = _padding_value(dataset, "PixelPaddingRangeLimit")
    if limit is None:
        return np.asarray(stored == value)
    low, high = sorted((value, limit))
    return np.asarray((stored >= low) & (stored <= high))


def _padding_value(dataset: Dataset, keyword: str) -> int | None:
    number = _first_number(dataset.get(keyword))
    if number is None:
        return None
    value = int(number)
    bits_allocated = int(dataset.BitsAllocated)
    # US-or-SS: a file may store a signed padding value as its unsigned bit pattern.
    if dataset.get("PixelRepresentation", 0) == 1 and value >= 1 << (bits_allocated - 1):
        value -= 1 << bits_allocated
    return value


# --- colour


def _colour_to_grey(decoded: np.ndarray, photometric: str, dataset: Dataset) -> np.ndarray:
    bits_stored = int(dataset.BitsStored)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(decoded, dataset)
        return luma(rgb) / _palette_full_scale(dataset, rgb)
    if photometric in ("RGB", "YBR_RCT", "YBR_ICT"):  # the JPEG 2000 decoder has undone RCT / ICT
        return luma(decoded) / ((1 << bits_stored) - 1)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):  # left as YCbCr: Y is the BT.601 luma already
        return decoded[..., 0].astype(np.float64) / ((1 << bits_stored) - 1)
    raise InvalidImage(f"{photometric} pixels cannot be reduced to grey")


def _palette_full_scale(dataset: Dataset, rgb: np.ndarray) -> float:
    bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
    if bits not in (8, 16):
        bits = rgb.dtype.itemsize * 8
    return float((1 << bits) - 1)


# --- lookup tables and values


@dataclass(frozen=True)
class _Lut:
    """A Modality or VOI LUT (PS3.3 C.11.1.1.1, C.11.2.1.1): inputs below the first map to the first entry, above
    the last to the last."""

    first_input: int
    entries: np.ndarray
    bits: int

    @classmethod
    def from_item(cls, item: Dataset, dataset: Dataset) -> _Lut:
        descriptor = [int(value) for value in item.LUTDescriptor]
        if len(descriptor) != 3:
            raise InvalidImage("a LUT Descriptor needs 3 values")
        count, first_input, bits = descriptor
        count = count or 1 << 16  # 0 means 65536 entries
        if dataset.get("PixelRepresentation", 0) == 1 and first_input >= 1 << 15:
            first_input -= 1 << 16  # US-or-SS read as unsigned
        if not 1 <= bits <= _MAX_LUT_BITS:
            raise InvalidImage(f"a LUT with {bits} bits per entry is not supported")
        return cls(first_input=first_input, entries=_lut_entries(item, dataset, count), bits=bits)

    @property
    def output_max(self) -> float:
        """The top of the output range; entries above the declared depth stretch it so the picture stays in [0, 1]."""
        return float(max((1 << self.bits) - 1, self.entries.max()))

    def apply(self, values: np.ndarray) -> np.ndarray:
        return self.entries[self._index(np.rint(values).astype(np.int64))]

    def output_range_for(self, low: int, high: int) -> tuple[float, float]:
        start, stop = self._index(np.array([low, high], dtype=np.int64))
        reachable = self.entries[start : stop + 1]
        return float(reachable.min()), float(reachable.max())

    def _index(self, inputs: np.ndarray) -> np.ndarray:
        return np.clip(inputs - self.first_input, 0, len(self.entries) - 1)


def _lut_entries(item: Dataset, dataset: Dataset, count: int) -> np.ndarray:
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16 bits per entry in the file's byte order, rarely 8
        byte_order = "<" if dataset.original_encoding[1] is not False else ">"
        entries = np.frombuffer(data, dtype=np.uint8 if len(data) == count else np.dtype(f"{byte_order}u2"))
    else:  # US: already numbers
        entries = np.atleast_1d(np.asarray(data, dtype=np.int64))
    if entries.size < count:
        raise InvalidImage(f"a LUT holds {entries.size} entries but its descriptor says {count}")
    return entries[:count].astype(np.float64)


def _first_item(dataset: Dataset, keyword: str) -> Dataset | None:
    sequence = dataset.get(keyword)
    return sequence[0] if sequence else None


def _first_number(value: object) -> float | None:
    """The first value of a numeric attribute (multi-valued windows: the first is the default view)."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise InvalidImage("a numeric attribute of the image header is not finite")
    return number


def _number_or(value: object, default: float) -> float:
    number = _first_number(value)
    return default if number is None else number
