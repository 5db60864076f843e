"""Grey DICOM pixels to the picture a viewer shows (PS3.3 C.7.6.3, C.11; docs/x-ray-input.md):

    stored values -> Modality LUT (LUT Sequence, else Rescale Slope/Intercept)
                  -> VOI (VOI LUT Sequence, else the first Window, else the stored range)
                  -> invert for MONOCHROME1 or Presentation LUT Shape INVERSE
                  -> Pixel Padding Value pixels to black

`frame_header` first gathers the attributes of frame 0: an enhanced (multi-frame) object keeps its rescale and
window in the Per-Frame and Shared Functional Groups (PS3.3 C.7.6.16), which win over the top level.

Every step's output range comes from the header, never from the pixels, so the picture is scaled the same way
whatever the image holds: no per-image min/max, no percentiles that would hide collimation. The steps are
written here rather than taken from `pydicom.pixels.apply_voi_lut` / `apply_modality_lut` (read before writing
this): pydicom's window outputs the *input's* range (which a rescale can make negative or reversed), its LUT
lookup truncates float input, it trusts the LUT Descriptor's bit depth, reads OW LUT Data as 16-bit always and
does not look into functional groups. The LUT quirks are handled as dcmtk's dcmimgle does (`DiLookupTable::
checkTable` / `checkBits`, `DiBaseLUT::getFirstEntry`) and Cornerstone's `getLUT`:

- the depth of a LUT's entries is taken from its largest entry, not the descriptor (dcmj2pnm
  `--ignore-vlut-depth`): modalities write "16" for 12-bit entries, which would present the picture at 1/16;
- the first input value mapped is signed when the step before the LUT can output negative values (the modality
  step for a VOI LUT, Pixel Representation for a Modality LUT), whatever VR pydicom gave the descriptor;
- 8-bit entries stored one a byte in OW (or US) data, an odd count padded to an even length, are unpacked.

An 8 or 16-bit integer image is presented through a table with an entry for each of its 256 or 65,536
possible values, so the float steps run on at most 65,536 values rather than on every pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from inferq.protocol.errors import InvalidImage
from inferq.workers.imaging.present import present_through_table

__all__ = ["frame_header", "present_monochrome"]

_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_MAX_LUT_BITS = 16
_MIN_LUT_BITS = 8  # dcmtk's MIN_TABLE_ENTRY_SIZE: a detected depth is never taken below a byte
_TABLE_DTYPES = tuple(np.dtype(name) for name in ("u1", "i1", "u2", "i2"))  # native byte order
# The attributes the presentation reads; the rescale and VOI ones may sit in a functional group instead.
_IMAGE_KEYWORDS = (
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "PresentationLUTShape",
    "ModalityLUTSequence",
)
_RESCALE_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "RescaleType")
_VOI_KEYWORDS = ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence")
# Functional group macros (PS3.3 C.7.6.16.2.9 Pixel Value Transformation, C.7.6.16.2.10 Frame VOI LUT) and the
# attributes each carries.
_FRAME_MACROS = (("PixelValueTransformationSequence", _RESCALE_KEYWORDS), ("FrameVOILUTSequence", _VOI_KEYWORDS))


def frame_header(dataset: Dataset, frame: int = 0) -> Dataset:
    """The attributes that present `frame`: the top level, overridden by the Shared Functional Groups, overridden
    by the frame's Per-Frame Functional Groups; a macro found in a group replaces all of its attributes."""
    header = Dataset()
    for keyword in (*_IMAGE_KEYWORDS, *_RESCALE_KEYWORDS, *_VOI_KEYWORDS):
        _copy(dataset, header, keyword)
    shared = _item(dataset.get("SharedFunctionalGroupsSequence"), 0)
    per_frame = _item(dataset.get("PerFrameFunctionalGroupsSequence"), frame)
    for group in (shared, per_frame):
        for macro, keywords in _FRAME_MACROS:
            item = _item(group.get(macro), 0) if group is not None else None
            if item is None:
                continue
            for keyword in keywords:
                if keyword in header:
                    delattr(header, keyword)
                _copy(item, header, keyword)
    return header


def _copy(source: Dataset, target: Dataset, keyword: str) -> None:
    element = source.data_element(keyword) if keyword in source else None
    if element is not None:
        target.add(element)


def present_monochrome(
    stored: np.ndarray,
    photometric: str,
    header: Dataset,
    *,
    little_endian: bool,
    halvings: int = 0,
    unused_bits_set: bool = False,
) -> np.ndarray:
    """The presented picture in [0, 1]: through a table for 8 and 16-bit integers (float32, checked finite and
    clipped to [0, 1] already), else computed on every pixel (float64, not yet checked).

    `halvings`: a picture presented through a table comes out halved that many times (block means, the first step
    of `geometry.fit`), presented a strip at a time; one computed on every pixel comes out whole.
    `unused_bits_set`: the 8 or 16-bit values are the frame's bytes as stored, whose bits above BitsStored may
    hold anything (PS3.5 8.1.1); each presents as the value those bits leave once cleared or sign-extended, as
    pydicom's decoders correct them, but in the table rather than in a pass over every pixel."""
    presentation = _Presentation.from_header(header, photometric, little_endian=little_endian)
    if stored.dtype not in _TABLE_DTYPES:
        return presentation.apply(stored)
    # One entry for every bit pattern of the container, indexed by the pattern read unsigned (no copy): values
    # outside what BitsStored allows cannot come from a conforming decoder, and get what the steps give them.
    unsigned = np.dtype(f"u{stored.dtype.itemsize}")
    patterns = np.arange(1 << (8 * stored.dtype.itemsize), dtype=np.int64).astype(unsigned).view(stored.dtype)
    if unused_bits_set:
        patterns = _clear_unused_bits(patterns, int(header.BitsStored))
    table = presentation.apply(patterns.astype(np.int64))
    if not np.all(np.isfinite(table)):
        raise InvalidImage("the image presents non-finite values")
    table = np.clip(table, 0.0, 1.0).astype(np.float32)
    return present_through_table(table, stored.view(unsigned), halvings)


def _clear_unused_bits(patterns: np.ndarray, bits_stored: int) -> np.ndarray:
    """Each value with the bits above `bits_stored` shifted out and back: cleared for an unsigned type,
    sign-extended for a signed one (pydicom's `_correct_unused_bits`)."""
    shift = 8 * patterns.dtype.itemsize - bits_stored
    if shift <= 0:
        return patterns
    return np.right_shift(np.left_shift(patterns, shift), shift)


@dataclass(frozen=True)
class _Presentation:
    """The grey presentation of one frame, applicable to any array of stored values."""

    header: Dataset
    invert: bool
    little_endian: bool

    @classmethod
    def from_header(cls, header: Dataset, photometric: str, *, little_endian: bool) -> _Presentation:
        # The DX module pairs MONOCHROME1 with INVERSE: both say the same thing, so they invert once, not twice.
        invert = photometric == "MONOCHROME1" or _presentation_shape(header) == "INVERSE"
        return cls(header=header, invert=invert, little_endian=little_endian)

    def apply(self, stored: np.ndarray) -> np.ndarray:
        values, values_range = _apply_modality(stored, self.header, little_endian=self.little_endian)
        picture = _apply_voi(values, values_range, self.header, little_endian=self.little_endian)
        if self.invert:
            picture = 1.0 - picture
        padding = _padding_mask(stored, self.header)
        return picture if padding is None else np.where(padding, 0.0, picture)


def _apply_modality(
    stored: np.ndarray, header: Dataset, *, little_endian: bool
) -> tuple[np.ndarray, tuple[float, float]]:
    """Modality values and the range they can take for this header's stored range."""
    low, high = _stored_range(header)
    item = _item(header.get("ModalityLUTSequence"), 0)
    if item is not None:
        signed = header.get("PixelRepresentation", 0) == 1
        lut = _Lut.from_item(item, signed_input=signed, little_endian=little_endian)
        return lut.apply(stored), lut.output_range_for(low, high)
    slope = _number_or(header.get("RescaleSlope"), 1.0)
    intercept = _number_or(header.get("RescaleIntercept"), 0.0)
    if slope == 0:
        raise InvalidImage("Rescale Slope is 0: every pixel would be the same")
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return stored.astype(np.float64) * slope + intercept, (ends[0], ends[1])


def _stored_range(header: Dataset) -> tuple[int, int]:
    """Smallest/Largest Image Pixel Value when they are sane, else all that BitsStored can hold."""
    bits_stored = int(header.BitsStored)
    if header.get("PixelRepresentation", 0) == 1:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        low, high = 0, (1 << bits_stored) - 1
    smallest = _first_number(header.get("SmallestImagePixelValue"))
    largest = _first_number(header.get("LargestImagePixelValue"))
    if smallest is not None and largest is not None and low <= smallest < largest <= high:
        return int(smallest), int(largest)
    return low, high


def _apply_voi(
    values: np.ndarray, values_range: tuple[float, float], header: Dataset, *, little_endian: bool
) -> np.ndarray:
    """The VOI step scaled by its own output range to [0, 1]."""
    item = _item(header.get("VOILUTSequence"), 0)
    if item is not None and "LUTDescriptor" in item and "LUTData" in item:
        # The VOI LUT's inputs are the modality step's outputs: signed exactly when those can be negative.
        lut = _Lut.from_item(item, signed_input=values_range[0] < 0, little_endian=little_endian)
        return lut.apply(values) / lut.output_max
    center = _first_number(header.get("WindowCenter"))
    width = _first_number(header.get("WindowWidth"))
    if center is not None and width is not None:
        function = str(header.get("VOILUTFunction") or "LINEAR").strip().upper()
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


def _presentation_shape(header: Dataset) -> str:
    return str(header.get("PresentationLUTShape") or "").strip().upper()


def _padding_mask(stored: np.ndarray, header: Dataset) -> np.ndarray | None:
    """Pixels outside the exposure (PS3.3 C.7.5.1.1.2), given as stored values; None when there are none."""
    value = _padding_value(header, "PixelPaddingValue")
    if value is None:
        return None
    limit = _padding_value(header, "PixelPaddingRangeLimit")
    if limit is None:
        return np.asarray(stored == value)
    low, high = sorted((value, limit))
    return np.asarray((stored >= low) & (stored <= high))


def _padding_value(header: Dataset, keyword: str) -> int | None:
    number = _first_number(header.get(keyword))
    if number is None:
        return None
    value = int(number)
    bits_allocated = int(header.BitsAllocated)
    # US-or-SS: a file may store a signed padding value as its unsigned bit pattern.
    if header.get("PixelRepresentation", 0) == 1 and value >= 1 << (bits_allocated - 1):
        value -= 1 << bits_allocated
    return value


# --- lookup tables


@dataclass(frozen=True)
class _Lut:
    """A Modality or VOI LUT (PS3.3 C.11.1.1.1, C.11.2.1.1): inputs below the first map to the first entry, above
    the last to the last."""

    first_input: int
    entries: np.ndarray
    bits: int

    @classmethod
    def from_item(cls, item: Dataset, *, signed_input: bool, little_endian: bool) -> _Lut:
        descriptor = [int(value) for value in item.LUTDescriptor]
        if len(descriptor) != 3:
            raise InvalidImage("a LUT Descriptor needs 3 values")
        count, first_input, declared_bits = descriptor
        count = (count & 0xFFFF) or 1 << 16  # 0 means 65536 entries
        first_input &= 0xFFFF  # pydicom gives US or SS by Pixel Representation; the step before decides
        if signed_input and first_input >= 1 << 15:
            first_input -= 1 << 16
        if not 1 <= declared_bits <= _MAX_LUT_BITS:
            raise InvalidImage(f"a LUT with {declared_bits} bits per entry is not supported")
        entries = _lut_entries(item, count, little_endian=little_endian)
        return cls(first_input=first_input, entries=entries, bits=_entry_bits(entries))

    @property
    def output_max(self) -> float:
        return float((1 << self.bits) - 1)

    def apply(self, values: np.ndarray) -> np.ndarray:
        return self.entries[self._index(np.rint(values).astype(np.int64))]

    def output_range_for(self, low: int, high: int) -> tuple[float, float]:
        start, stop = self._index(np.array([low, high], dtype=np.int64))
        reachable = self.entries[start : stop + 1]
        return float(reachable.min()), float(reachable.max())

    def _index(self, inputs: np.ndarray) -> np.ndarray:
        return np.clip(inputs - self.first_input, 0, len(self.entries) - 1)


def _entry_bits(entries: np.ndarray) -> int:
    """The depth the entries use: the bit length of the largest, at least 8 (dcmtk `checkBits`, ELM_IgnoreValue)."""
    largest = int(entries.max()) if entries.size else 0
    return min(_MAX_LUT_BITS, max(_MIN_LUT_BITS, largest.bit_length()))


def _lut_entries(item: Dataset, count: int, *, little_endian: bool) -> np.ndarray:
    """The LUT's `count` entries as float64, from OW bytes (in the file's byte order) or US values."""
    data = item.LUTData
    words: np.ndarray
    if isinstance(data, bytes):
        words = np.frombuffer(data[: len(data) // 2 * 2], dtype=np.dtype("<u2" if little_endian else ">u2"))
    else:
        words = np.atleast_1d(np.asarray(data, dtype=np.int64)) & 0xFFFF
    # 8-bit entries one a byte fill half as many words as entries, an odd count padded with one byte
    # (dcmtk's checkTable: "bits allocated 8, ignore padding"); each word's low byte comes first.
    packed = count > 1 and words.size == (count + 1) // 2
    entries = words.astype("<u2").view(np.uint8) if packed else words
    if entries.size < count:
        raise InvalidImage(f"a LUT holds {entries.size} entries but its descriptor says {count}")
    return entries[:count].astype(np.float64)


# --- values


def _item(sequence: object, index: int) -> Dataset | None:
    if not isinstance(sequence, Sequence) or len(sequence) <= index:
        return None
    item = sequence[index]
    return item if isinstance(item, Dataset) else None


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
