"""inferq.producers.samples: synthetic chest X-rays that every reader must read alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inferq.producers.samples import SAMPLE_NAMES, SAMPLE_SIZE_PX, chest_picture, write_samples
from inferq.protocol.registry import ImageInput
from inferq.workers.imaging import read_picture, to_model_input

MAX_PIXELS = 40_000_000
SPEC = ImageInput(height=224, width=224, channels=1)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_samples(tmp_path_factory.mktemp("samples"))


def _tensor(path: Path) -> np.ndarray:
    return to_model_input(read_picture(path.read_bytes(), max_image_pixels=MAX_PIXELS), SPEC)


def test_samples_are_written_in_a_stable_order(samples: list[Path]) -> None:
    assert [path.name for path in samples] == list(SAMPLE_NAMES)
    assert len(set(SAMPLE_NAMES)) == 6
    assert all(path.is_file() and path.stat().st_size > 1000 for path in samples)


def test_samples_are_byte_identical_on_every_run(samples: list[Path], tmp_path: Path) -> None:
    again = write_samples(tmp_path / "again")
    for first, second in zip(samples, again, strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name


def test_every_sample_reads_to_a_finite_picture(samples: list[Path]) -> None:
    for path in samples:
        picture = read_picture(path.read_bytes(), max_image_pixels=MAX_PIXELS)
        assert picture.pixels.shape == (SAMPLE_SIZE_PX, SAMPLE_SIZE_PX), path.name
        assert np.all(np.isfinite(picture.pixels)), path.name
        assert 0.1 < picture.pixels.mean() < 0.7, path.name


def test_all_samples_give_the_same_tensor(samples: list[Path]) -> None:
    tensors = {path.name: _tensor(path) for path in samples}
    reference = tensors["chest-dx-16bit.dcm"]
    for name, tensor in tensors.items():
        correlation = np.corrcoef(tensor.ravel(), reference.ravel())[0, 1]
        assert correlation > 0.99, name
        assert np.abs(tensor - reference).mean() < 0.01, name
    lossless = ("chest-dx-16bit.dcm", "chest-mono1-j2k.dcm")  # 12-bit, MONOCHROME2 and MONOCHROME1
    np.testing.assert_allclose(tensors[lossless[0]], tensors[lossless[1]], atol=1e-6)


def test_the_picture_looks_like_a_chest() -> None:
    picture = chest_picture(256)
    lungs = picture[100:170, 60:100].mean()  # the patient's right lung field, image left
    mediastinum = picture[100:170, 120:136].mean()  # spine and heart
    outside = picture[:12, :12].mean()
    assert outside < 0.05 < lungs < mediastinum
    assert np.array_equal(picture, chest_picture(256))


def test_dicom_samples_are_valid_part10_dx_with_synthetic_patient(samples: list[Path]) -> None:
    expectations = {
        "chest-dx-16bit.dcm": ("1.2.840.10008.1.2.1", "MONOCHROME2", 16, 12),
        "chest-mono1-j2k.dcm": ("1.2.840.10008.1.2.4.90", "MONOCHROME1", 16, 12),
        "chest-rle.dcm": ("1.2.840.10008.1.2.5", "MONOCHROME2", 8, 8),
    }
    for path in samples:
        if path.suffix != ".dcm":
            continue
        dataset = pydicom.dcmread(path)  # raises without the Part 10 preamble and file meta
        transfer_syntax, photometric, bits_allocated, bits_stored = expectations[path.name]
        assert dataset.file_meta.TransferSyntaxUID == transfer_syntax
        assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"  # DX For Presentation
        assert dataset.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID
        assert (dataset.PhotometricInterpretation, dataset.BitsAllocated, dataset.BitsStored) == (
            photometric,
            bits_allocated,
            bits_stored,
        )
        assert (str(dataset.PatientName), dataset.PatientID) == ("SYNTHETIC^DEMO", "DEMO-0001")
        assert dataset.PresentationLUTShape == ("INVERSE" if photometric == "MONOCHROME1" else "IDENTITY")
        assert dataset.pixel_array.shape == (SAMPLE_SIZE_PX, SAMPLE_SIZE_PX)


def test_dx_sample_carries_rescale_and_window(samples: list[Path]) -> None:
    dataset = pydicom.dcmread(samples[0])
    assert (dataset.RescaleSlope, dataset.RescaleIntercept) == (1, 0)
    assert (dataset.WindowCenter, dataset.WindowWidth) == (2048, 4096)


def test_imaging_modules_do_not_import_torch() -> None:
    code = (
        "import sys, inferq.producers.samples, protocol.media, workers.imaging; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
