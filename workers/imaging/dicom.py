"""Read a DICOM image the way a viewer presents it (docs/x-ray-input.md; PS3.3 C.7.6.3, C.11).

    open_dicom (protocol.media): header checks, parsed once -> decode frame 0 (reduced where the codestream
    allows and the model needs less) -> grey: `monochrome.present_monochrome`; colour (RGB, YBR_*, PALETTE
    COLOR) -> BT.601 luma

Frame 0 on purpose: a multi-frame X-ray's frames are separate exposures, and averaging them would blur. The
dataset the header checks parsed is the one decoded: its pixel data, left on the upload's bytes by the probe,
is read only here.
"""

from __future__ import annotations

import sys
from io import BytesIO

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, as_pixel_options, get_decoder
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    RLELossless,
)

from inferq.protocol.errors import InvalidImage
from inferq.protocol.media import ImageInfo, check_fits, open_dicom, third_party_boundary, unread_pixel_data_offset
from inferq.protocol.registry import ImageInput
from inferq.workers.imaging.codestream import (
    JPEG_BASELINE_SOF,
    codestream_size,
    decode_j2k,
    decode_jpeg_scaled,
    j2k_header,
    jpeg_precision,
)
from inferq.workers.imaging.geometry import (
    align_wavelet_samples,
    halvings_before_fit,
    needed_size,
    reduction_levels,
)
from inferq.workers.imaging.monochrome import frame_header, present_monochrome
from inferq.workers.imaging.present import Picture, luma, make_picture

__all__ = ["read_dicom"]

# Pinned where available so a lossy frame decodes to the same values whatever other plugins are installed.
_PREFERRED_PLUGIN = "pylibjpeg"
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000)
_JPEG_8BIT_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit)  # the latter may hold 8-bit frames too
_MAX_REDUCED_BITS = 16  # Pillow's JPEG 2000 reader holds a grey sample in at most 16 bits
# Uncompressed syntaxes whose frame is the upload's own bytes in this host's order: read in place (`_as_stored`).
_IN_PLACE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if sys.byteorder == "little" else ()


def read_dicom(data: bytes, *, max_image_pixels: int, spec: ImageInput | None = None) -> Picture:
    """The presented first frame of a DICOM Part 10 upload; every failure is an `InvalidImage` (or subclass).

    With `spec`, the image must fit the model (view, body part) and may be decoded at the smallest resolution
    that still covers the model's input; without, it is decoded whole."""
    info, dataset = open_dicom(data, max_image_pixels=max_image_pixels)
    if spec is not None:
        check_fits(info, spec)
    with third_party_boundary("DICOM image"):
        frame = _encapsulated_frame(dataset, info, data)
        if frame is not None:
            _check_codestream_size(frame, info)
        as_stored = _as_stored(dataset, info, data) if frame is None else None
        if as_stored is not None:
            decoded, photometric, wavelet_halvings = as_stored, info.photometric_interpretation, 0
        else:
            decoded, photometric, wavelet_halvings = _decode_first_frame(dataset, info, frame, spec)
        # A frame decoded whole is halved while it is presented, as far as the fit would halve it first: a
        # detector-sized film then never exists as a full-size float picture.
        halvings = 0
        if spec is not None and wavelet_halvings == 0 and decoded.ndim == 2:
            halvings = halvings_before_fit(decoded.shape[0], decoded.shape[1], spec)
        grey = _present(decoded, photometric, dataset, halvings=halvings, unused_bits_set=as_stored is not None)
    if wavelet_halvings:
        grey = align_wavelet_samples(grey, wavelet_halvings)
    # A grey frame presented through a table is float32, finite and in [0, 1] already.
    return make_picture(grey, info, checked=grey.dtype == np.float32)


def _as_stored(dataset: Dataset, info: ImageInfo, data: bytes) -> np.ndarray | None:
    """Frame 0 of an uncompressed little-endian grey image of 8 or 16-bit samples, as a read-only view of the
    upload's bytes, its bits above BitsStored as stored (the presentation table clears them); None otherwise.

    pydicom's decoder would copy the pixel data out of the upload, copy it again, and shift every value to clear
    those bits: three passes over a 10 MB detector frame, which cost 22 of the 48 ms the DX took to preprocess."""
    if dataset.file_meta.TransferSyntaxUID not in _IN_PLACE_SYNTAXES:
        return None
    if info.photometric_interpretation not in _MONOCHROME or dataset.get("SamplesPerPixel", 1) != 1:
        return None
    bits_allocated = int(dataset.BitsAllocated)
    if bits_allocated not in (8, 16):
        return None
    offset = unread_pixel_data_offset(dataset)
    if offset is None:
        return None  # read already (a small frame): pydicom's decoder costs nothing worth saving
    dtype = np.dtype(f"{'i' if dataset.get('PixelRepresentation', 0) == 1 else 'u'}{bits_allocated // 8}")
    count = info.rows * info.columns
    # The probe checked that the pixel data holds every frame; a frame past the upload's end is refused here too.
    if offset + count * dtype.itemsize > len(data):
        return None
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(info.rows, info.columns)


def _decode_first_frame(
    dataset: Dataset, info: ImageInfo, frame: bytes | None, spec: ImageInput | None
) -> tuple[np.ndarray, str, int]:
    """Stored values of frame 0, the photometric interpretation *after* decoding (pydicom turns YBR_FULL(_422)
    into RGB, and the JPEG 2000 decoder undoes YBR_RCT / YBR_ICT), and how many JPEG 2000 resolution levels
    down the values were decoded."""
    if frame is not None and spec is not None and info.photometric_interpretation in _MONOCHROME:
        reduced = _decode_reduced(dataset, info, frame, spec)
        if reduced is not None:
            return reduced[0], info.photometric_interpretation, reduced[1]
    decoder = get_decoder(dataset.file_meta.TransferSyntaxUID)
    plugin = _PREFERRED_PLUGIN if _PREFERRED_PLUGIN in decoder.available_plugins else ""
    options = as_pixel_options(dataset)
    array, properties = decoder.as_array(dataset, index=0, validate=True, raw=False, decoding_plugin=plugin, **options)
    return array, str(properties["photometric_interpretation"]), 0


def _decode_reduced(dataset: Dataset, info: ImageInfo, frame: bytes, spec: ImageInput) -> tuple[np.ndarray, int] | None:
    """A grey unsigned frame decoded smaller, where its codestream allows and the model's input is smaller
    still, with the JPEG 2000 levels it went down (0 for a DCT-scaled JPEG, whose block means sit where the
    fit's do); None to decode it whole. Signed or colour frames, and the rest, are decoded whole."""
    if dataset.get("PixelRepresentation", 0) != 0:
        return None
    transfer_syntax = dataset.file_meta.TransferSyntaxUID
    if transfer_syntax in _J2K_SYNTAXES:
        header = j2k_header(frame)
        if header is None or header.components != 1 or header.signed or header.precision > _MAX_REDUCED_BITS:
            return None
        if (header.height, header.width) != (info.rows, info.columns):
            return None
        levels = reduction_levels(info.rows, info.columns, spec, most=header.levels)
        return (decode_j2k(frame, header, levels), levels) if levels else None
    if transfer_syntax in _JPEG_8BIT_SYNTAXES and jpeg_precision(frame) == (JPEG_BASELINE_SOF, 8):
        need = needed_size(info.rows, info.columns, spec)
        if need[0] * 2 > info.rows or need[1] * 2 > info.columns:
            return None
        return decode_jpeg_scaled(frame, need), 0
    return None


def _present(
    decoded: np.ndarray, photometric: str, dataset: Dataset, *, halvings: int, unused_bits_set: bool
) -> np.ndarray:
    if photometric in _MONOCHROME:
        little_endian = dataset.original_encoding[1] is not False
        header = frame_header(dataset)
        return present_monochrome(
            decoded,
            photometric,
            header,
            little_endian=little_endian,
            halvings=halvings,
            unused_bits_set=unused_bits_set,
        )
    return _colour_to_grey(decoded, photometric, dataset)


# --- guarding the decoder


def _encapsulated_frame(dataset: Dataset, info: ImageInfo, data: bytes) -> bytes | None:
    """Frame 0's compressed bytes (JPEG, JPEG-LS, JPEG 2000); None for native pixel data or RLE. Read from the
    upload where the probe left the pixel data unread: reading it whole first copies every frame's fragments
    (a 4.4 MB JPEG 2000 film: 7.0 ms against 3.3)."""
    transfer_syntax = dataset.file_meta.TransferSyntaxUID
    if not transfer_syntax.is_encapsulated or transfer_syntax == RLELossless:
        return None
    offset = unread_pixel_data_offset(dataset)
    source: bytes | BytesIO
    if offset is None:
        source = dataset.PixelData
    else:
        source = BytesIO(data)
        source.seek(offset)
    return bytes(get_frame(source, 0, number_of_frames=info.frames, extended_offsets=_offsets(dataset)))


def _check_codestream_size(frame: bytes, info: ImageInfo) -> None:
    """A JPEG or JPEG 2000 frame declares its own size, and the decoder allocates by it, not by Rows x Columns:
    refuse a frame larger than the header (checked against `max_image_pixels`) says, before decoding it."""
    size = codestream_size(frame)
    if size is not None and size[0] * size[1] > info.rows * info.columns:
        raise InvalidImage(
            f"the compressed frame is {size[0]} x {size[1]} pixels but the header says {info.rows} x {info.columns}"
        )


def _offsets(dataset: Dataset) -> tuple[bytes, bytes] | None:
    offsets = dataset.get("ExtendedOffsetTable")
    lengths = dataset.get("ExtendedOffsetTableLengths")
    return (offsets, lengths) if offsets and lengths else None


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
