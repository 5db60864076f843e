"""ModelRunner.prepare: one job's model input without the batch axis, the seam the batching path calls."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inferq.config import Settings
from inferq.protocol.codec import tensor_to_bytes
from inferq.protocol.errors import UnsupportedView
from inferq.protocol.registry import ImageInput, ModelSpec, Registry, load_registry
from inferq.workers.imaging import preprocess
from inferq.workers.inference import ModelRunner

MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(Settings().registry_path)


def _runner(spec: ModelSpec, module: torch.nn.Module) -> ModelRunner:
    return ModelRunner(spec, module.eval(), torch.device("cpu"), max_image_pixels=MAX_PIXELS)


def _mean_then_linear(outputs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(1, outputs))


def _png(rows: int, columns: int) -> bytes:
    ramp = (np.arange(rows * columns).reshape(rows, columns) % 251).astype(np.uint8)
    buffer = BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return buffer.getvalue()


def _lateral_chest() -> bytes:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["inferq-prepare"])
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.BodyPartExamined, dataset.ViewPosition = "CR", "CHEST", "LL"
    dataset.Rows, dataset.Columns = 8, 8
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = bytes(range(64))
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_an_image_job_is_prepared_as_one_chw_tensor_and_run_from_it(registry: Registry) -> None:
    spec = registry.get_model("chest-xray")
    runner = _runner(spec, _mean_then_linear(len(spec.labels)))
    blob = _png(300, 260)
    tensor, info = runner.prepare(blob)
    assert isinstance(spec.input, ImageInput)
    assert tensor.shape == (spec.input.channels, spec.input.height, spec.input.width)
    assert tensor.dtype == np.float32
    assert info is not None and (info.rows, info.columns) == (300, 260)
    expected, _ = preprocess(blob, spec.input, max_image_pixels=MAX_PIXELS)
    assert tensor.tobytes() == expected.tobytes()
    result = runner.run(blob)
    probabilities = [finding["probability"] for finding in result["findings"]]
    np.testing.assert_allclose(probabilities, runner.infer(tensor[np.newaxis])[0], rtol=1e-6)


def test_a_tensor_job_is_prepared_as_its_rows(registry: Registry) -> None:
    spec = registry.get_model("fraud")
    torch.manual_seed(0)
    runner = _runner(spec, torch.nn.Linear(30, 1))
    rows = np.random.default_rng(3).normal(size=(5, 30)).astype(np.float32)
    assert not isinstance(spec.input, ImageInput)
    tensor, info = runner.prepare(tensor_to_bytes(rows, spec.input.name))
    assert info is None
    np.testing.assert_array_equal(tensor, rows)
    result = runner.run(tensor_to_bytes(rows, spec.input.name))
    assert len(result["outputs"][0]["data"]) == 5


def test_a_lateral_film_is_refused_by_the_chest_model_when_prepared(registry: Registry) -> None:
    spec = registry.get_model("chest-xray")
    runner = _runner(spec, _mean_then_linear(len(spec.labels)))
    with pytest.raises(UnsupportedView):
        runner.prepare(_lateral_chest())
