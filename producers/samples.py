"""Synthetic chest X-ray images for demos and tests: drawn with numpy, identical on every run, no patient.

One picture (a PA chest: body, lungs, ribs, clavicles, spine, heart, diaphragm) is stored six ways, each a
case the workers must read to the same picture: 16-bit DX with a window, MONOCHROME1 JPEG 2000 lossless,
8-bit RLE, 8-bit PNG, 16-bit PNG and JPEG. The DICOM files are Part 10 Digital X-Ray (For Presentation) objects
with fake, obviously synthetic patient attributes and UIDs derived from the file name, so the bytes never change.

`write_large_samples` writes detector-sized films (2500 x 2000, with quantum noise so they compress as real ones
do) for measuring decode cost: an uncompressed 12-bit DX, a JPEG 2000 lossless CR, a JPEG and a 16-bit PNG. They
are not in `SAMPLE_NAMES`, so the demo and the small samples stay as they are.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "LARGE_SAMPLE_NAMES",
    "LARGE_SAMPLE_SHAPE_PX",
    "SAMPLE_NAMES",
    "SAMPLE_SIZE_PX",
    "chest_picture",
    "write_large_samples",
    "write_samples",
]

SAMPLE_NAMES = (
    "chest-dx-16bit.dcm",
    "chest-mono1-j2k.dcm",
    "chest-rle.dcm",
    "chest-8bit.png",
    "chest-16bit.png",
    "chest.jpg",
)
SAMPLE_SIZE_PX = 512
LARGE_SAMPLE_NAMES = (
    "chest-dx-2500x2000-12bit.dcm",
    "chest-cr-2500x2000-j2k.dcm",
    "chest-2500x2000.jpg",
    "chest-2500x2000-16bit.png",
)
LARGE_SAMPLE_SHAPE_PX = (2500, 2000)  # rows, columns: a 43 x 35 cm detector at about 0.17 mm
_CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography Image Storage
_NOISE_SEED = 2026
_NOISE_STD = 0.006  # quantum noise, as a fraction of full scale: what keeps lossless ratios near real ones
_DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
_UID_ENTROPY = "inferq-synthetic-chest-sample"
_BITS_STORED_12 = 12
_JPEG_QUALITY = 92
_BLUR_RADIUS_PX = 3


def write_samples(directory: Path) -> list[Path]:
    """Write every sample into `directory` (created if missing); the paths in `SAMPLE_NAMES` order."""
    directory.mkdir(parents=True, exist_ok=True)
    picture = chest_picture(SAMPLE_SIZE_PX)
    writers = {
        "chest-dx-16bit.dcm": lambda: _dx_16bit(picture),
        "chest-mono1-j2k.dcm": lambda: _mono1_j2k(picture),
        "chest-rle.dcm": lambda: _rle_8bit(picture),
        "chest-8bit.png": lambda: _png(_quantise(picture, 255).astype(np.uint8)),
        "chest-16bit.png": lambda: _png(_quantise(picture, 65535).astype(np.uint16)),
        "chest.jpg": lambda: _jpeg(picture),
    }
    paths = []
    for name in SAMPLE_NAMES:
        path = directory / name
        path.write_bytes(writers[name]())
        paths.append(path)
    return paths


def write_large_samples(directory: Path) -> list[Path]:
    """Write the detector-sized samples into `directory`; the paths in `LARGE_SAMPLE_NAMES` order."""
    directory.mkdir(parents=True, exist_ok=True)
    rows, columns = LARGE_SAMPLE_SHAPE_PX
    picture = np.clip(chest_picture(rows, columns_px=columns) + _noise(rows, columns), 0.0, 1.0)
    writers = {
        "chest-dx-2500x2000-12bit.dcm": lambda: _dx_16bit(picture, name="chest-dx-2500x2000-12bit.dcm"),
        "chest-cr-2500x2000-j2k.dcm": lambda: _cr_j2k(picture),
        "chest-2500x2000.jpg": lambda: _jpeg(picture),
        "chest-2500x2000-16bit.png": lambda: _png(_quantise(picture, 65535).astype(np.uint16)),
    }
    paths = []
    for name in LARGE_SAMPLE_NAMES:
        path = directory / name
        path.write_bytes(writers[name]())
        paths.append(path)
    return paths


def chest_picture(size_px: int = SAMPLE_SIZE_PX, *, columns_px: int | None = None) -> np.ndarray:
    """A PA chest as a viewer shows it: float64 (size, columns or size) in [0, 1], 0 = black (air), bone bright.

    Densities add up along the beam, as in a radiograph: soft tissue, then air in the lungs takes some away,
    then ribs, heart, spine and clavicles add theirs.
    """
    rows, columns = size_px, columns_px or size_px
    y, x = np.mgrid[0:rows, 0:columns] / np.array([rows, columns]).reshape(2, 1, 1)  # fractions, origin top left
    trunk = _ellipse(x, y, centre=(0.5, 0.62), radii=(0.42, 0.62)) | _ellipse(
        x, y, centre=(0.5, 0.3), radii=(0.47, 0.16)
    )  # chest and shoulders
    arms = _ellipse(x, y, centre=(0.05, 0.55), radii=(0.07, 0.45)) | _ellipse(
        x, y, centre=(0.95, 0.55), radii=(0.07, 0.45)
    )
    lungs = _lungs(x, y)
    density = 0.5 * trunk + 0.42 * (arms & ~trunk) - 0.32 * lungs
    density += 0.16 * (_ribs(x, y) & trunk & (np.abs(x - 0.5) < 0.36))
    density += 0.22 * _ellipse(x, y, centre=(0.56, 0.63), radii=(0.15, 0.13))  # heart, to the patient's left
    density += 0.28 * _spine(x, y) + 0.25 * _clavicles(x, y)
    return np.clip(_box_blur(density, _BLUR_RADIUS_PX), 0.0, 1.0)


def _ellipse(x: np.ndarray, y: np.ndarray, *, centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    return np.asarray(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 <= 1.0)


def _lungs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two lungs whose bases are the domes of the diaphragm, the right dome (image left) a little higher."""
    right = _ellipse(x, y, centre=(0.33, 0.5), radii=(0.15, 0.33)) & (y < 0.74 + 0.25 * (x - 0.3) ** 2 * 4)
    left = _ellipse(x, y, centre=(0.68, 0.52), radii=(0.15, 0.33)) & (y < 0.77 + 0.25 * (x - 0.7) ** 2 * 4)
    return np.asarray(right | left)


def _ribs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Arcs that fall away from the spine on both sides, like posterior ribs."""
    phase = (y - 0.55 * np.abs(x - 0.5) ** 1.5) * 17.0
    return np.asarray((phase % 1.0 < 0.3) & (y > 0.16) & (y < 0.8))


def _spine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A column of vertebral bodies with darker discs between them."""
    bodies = (y * 22.0) % 1.0 < 0.8
    return np.asarray((np.abs(x - 0.5) < 0.04) & (y > 0.04) & bodies)


def _clavicles(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    rise = 0.2 - 0.12 * np.abs(x - 0.5)
    return np.asarray((np.abs(y - rise) < 0.014) & (np.abs(x - 0.5) > 0.04) & (np.abs(x - 0.5) < 0.32))


def _box_blur(picture: np.ndarray, radius_px: int) -> np.ndarray:
    """A separable box blur (edges replicated), so the drawing has the soft edges of a radiograph."""
    width = 2 * radius_px + 1
    kernel = np.ones(width) / width
    padded = np.pad(picture, radius_px, mode="edge")
    rows = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="valid"), 1, padded)
    return np.apply_along_axis(lambda column: np.convolve(column, kernel, mode="valid"), 0, rows)


def _noise(rows: int, columns: int) -> np.ndarray:
    return np.random.default_rng(_NOISE_SEED).normal(0.0, _NOISE_STD, (rows, columns))


def _quantise(picture: np.ndarray, full_scale: int) -> np.ndarray:
    return np.rint(picture * full_scale).astype(np.int64)


# --- DICOM


def _dx_16bit(picture: np.ndarray, *, name: str = "chest-dx-16bit.dcm") -> bytes:
    """12 bits stored in 16, MONOCHROME2, with the DX module's identity rescale and a window covering the range."""
    dataset = _dx_dataset(name, ExplicitVRLittleEndian)
    stored = _quantise(picture, (1 << _BITS_STORED_12) - 1).astype(np.uint16)
    _set_pixels(dataset, stored, bits_stored=_BITS_STORED_12, photometric="MONOCHROME2")
    dataset.RescaleSlope = 1  # the DX module fixes slope 1 and intercept 0 (PS3.3 C.8.11.3.1.2)
    dataset.RescaleIntercept = 0
    dataset.RescaleType = "US"
    # LINEAR: lowest output at c - 0.5 - (w - 1) / 2 = 0, highest at c - 0.5 + (w - 1) / 2 = 4095
    dataset.WindowCenter = 2048
    dataset.WindowWidth = 4096
    dataset.VOILUTFunction = "LINEAR"
    return _encode(dataset)


def _mono1_j2k(picture: np.ndarray) -> bytes:
    """High values dark; the DX module pairs MONOCHROME1 with Presentation LUT Shape INVERSE (one inversion)."""
    dataset = _dx_dataset("chest-mono1-j2k.dcm", ExplicitVRLittleEndian)
    full_scale = (1 << _BITS_STORED_12) - 1
    stored = (full_scale - _quantise(picture, full_scale)).astype(np.uint16)
    _set_pixels(dataset, stored, bits_stored=_BITS_STORED_12, photometric="MONOCHROME1")
    dataset.PresentationLUTShape = "INVERSE"
    dataset.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return _encode(dataset)


def _cr_j2k(picture: np.ndarray) -> bytes:
    """A CR as a plate reader stores it: 12 bits, JPEG 2000 lossless, a log-like rescale and a window."""
    name = "chest-cr-2500x2000-j2k.dcm"
    dataset = _dx_dataset(name, ExplicitVRLittleEndian)
    dataset.file_meta.MediaStorageSOPClassUID = _CR_STORAGE
    dataset.SOPClassUID = _CR_STORAGE
    dataset.Modality = "CR"
    del dataset.PresentationIntentType  # a DX attribute
    stored = _quantise(picture, (1 << _BITS_STORED_12) - 1).astype(np.uint16)
    _set_pixels(dataset, stored, bits_stored=_BITS_STORED_12, photometric="MONOCHROME2")
    dataset.RescaleSlope = 2
    dataset.RescaleIntercept = -1000
    dataset.RescaleType = "US"
    # LINEAR: lowest output at c - 0.5 - (w - 1) / 2 = -1000, highest at c - 0.5 + (w - 1) / 2 = 7190
    dataset.WindowCenter = 3095.5
    dataset.WindowWidth = 8191
    dataset.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return _encode(dataset)


def _rle_8bit(picture: np.ndarray) -> bytes:
    dataset = _dx_dataset("chest-rle.dcm", ExplicitVRLittleEndian)
    stored = _quantise(picture, 255).astype(np.uint8)
    _set_pixels(dataset, stored, bits_stored=8, photometric="MONOCHROME2")
    dataset.compress(RLELossless, stored, encoding_plugin="pydicom", generate_instance_uid=False)
    return _encode(dataset)


def _dx_dataset(name: str, transfer_syntax: UID) -> Dataset:
    instance_uid = _uid(name)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = _DX_FOR_PRESENTATION
    dataset.SOPInstanceUID = instance_uid
    dataset.StudyInstanceUID = _uid("study")
    dataset.SeriesInstanceUID = _uid(f"series/{name}")
    dataset.Modality = "DX"
    dataset.PresentationIntentType = "FOR PRESENTATION"
    dataset.ImageType = ["ORIGINAL", "PRIMARY"]
    dataset.BodyPartExamined = "CHEST"
    dataset.ViewPosition = "PA"
    dataset.PatientName = "SYNTHETIC^DEMO"
    dataset.PatientID = "DEMO-0001"
    dataset.PatientBirthDate = ""
    dataset.PatientSex = "O"
    dataset.StudyDate = "20000101"
    dataset.StudyTime = "000000"
    dataset.StudyDescription = "Synthetic chest X-ray drawn by inferq (not a patient)"
    dataset.Manufacturer = "inferq synthetic samples"
    dataset.AccessionNumber = ""
    dataset.ReferringPhysicianName = ""
    dataset.StudyID = "DEMO"
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = 1
    return dataset


def _set_pixels(dataset: Dataset, stored: np.ndarray, *, bits_stored: int, photometric: str) -> None:
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = stored.dtype.itemsize * 8
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = 0
    dataset.PresentationLUTShape = "IDENTITY"
    dataset.PixelData = stored.tobytes()


def _uid(name: str) -> UID:
    return generate_uid(entropy_srcs=[_UID_ENTROPY, name])


def _encode(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- PNG and JPEG


def _png(stored: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG")  # uint8 -> "L", uint16 -> "I;16", a 16-bit PNG
    return buffer.getvalue()


def _jpeg(picture: np.ndarray) -> bytes:
    buffer = BytesIO()
    grey = Image.fromarray(_quantise(picture, 255).astype(np.uint8))
    grey.save(buffer, format="JPEG", quality=_JPEG_QUALITY, optimize=False, progressive=False)
    return buffer.getvalue()
