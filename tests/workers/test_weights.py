"""Weights: reproducible generation, checksums that refuse bad files, and loading of every registry format."""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
from torch import nn

from inferq.config.settings import CONFIG_DIR, DEFAULT_REGISTRY_PATH, Settings
from inferq.protocol.errors import ChecksumMismatch, ConfigError, ModelLoadError
from inferq.protocol.registry import ImageInput, ModelSpec, Registry, TensorInput, load_registry, parse_registry
from inferq.workers.weights import (
    ensure_generated_weights,
    file_sha256,
    generate_weights,
    load_model,
    verify_checksum,
    write_weights,
)

CPU = torch.device("cpu")
ModelFormat = Literal["safetensors", "torch-export"]
REPO_ROOT = CONFIG_DIR.parent


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(DEFAULT_REGISTRY_PATH)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Settings:
    """Settings whose models directory holds freshly generated weights of every generated registry model."""
    models_dir = tmp_path_factory.mktemp("models")
    settings = Settings(registry_path=DEFAULT_REGISTRY_PATH, models_dir=models_dir)
    for spec in registry.values():
        ensure_generated_weights(spec, settings)
    return settings


@pytest.fixture(scope="module")
def chest_model(registry: Registry, settings: Settings) -> nn.Module:
    return load_model(registry["chest-xray"], settings, CPU)


def _chest_images(spec: ModelSpec, *, count: int, seed: int) -> torch.Tensor:
    """Smooth random pictures in [0, 1], normalised as the registry says: closer to an X-ray than pixel noise."""
    assert isinstance(spec.input, ImageInput)
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, 14, 14, generator=generator)
    pictures = nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear", align_corners=False)
    return (pictures - spec.input.mean[0]) / spec.input.std[0]


def _copy_spec(spec: ModelSpec, path: Path, **changes: Any) -> ModelSpec:
    """`spec` pointing at `path` (absolute), with the sha256 of what is there now."""
    return spec.model_copy(update={"weights": str(path), "sha256": file_sha256(path), **changes})


def _tiny_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()


def _tiny_spec(path: Path, model_format: ModelFormat) -> ModelSpec:
    return ModelSpec(
        name="tiny",
        version="1",
        format=model_format,
        weights=str(path),
        sha256=file_sha256(path),
        trained=False,
        input=TensorInput(shape=(-1, 6)),
        labels=("a", "b"),
    )


# --- generation


@pytest.mark.parametrize("name", ["chest-xray", "fraud"])
def test_generation_is_deterministic(registry: Registry, name: str) -> None:
    first, second = generate_weights(registry[name]), generate_weights(registry[name])

    assert list(first) == sorted(first) == list(second)
    for key in first:
        assert first[key].dtype == second[key].dtype
        np.testing.assert_array_equal(first[key], second[key])


@pytest.mark.parametrize("name", ["chest-xray", "fraud"])
def test_generated_files_have_the_registrys_sha256(registry: Registry, settings: Settings, name: str) -> None:
    path = settings.resolve_weights(registry[name].weights)

    assert file_sha256(path) == registry[name].sha256


def test_a_fresh_process_writes_the_same_bytes(registry: Registry, tmp_path: Path) -> None:
    # A new process gets new hash seeds (Python's and Rust's): the bytes must not depend on either.
    path = tmp_path / "fraud.safetensors"
    program = (
        "import sys; from pathlib import Path; from inferq.config.settings import DEFAULT_REGISTRY_PATH; "
        "from protocol.registry import load_registry; from workers.weights import write_weights; "
        "print(write_weights(load_registry(DEFAULT_REGISTRY_PATH)['fraud'], Path(sys.argv[1])))"
    )

    completed = subprocess.run(
        [sys.executable, "-c", program, str(path)], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )

    assert completed.stdout.strip() == file_sha256(path) == registry["fraud"].sha256


def test_generated_values_follow_the_initialisation_rules(registry: Registry) -> None:
    weights = generate_weights(registry["chest-xray"])

    assert weights["features.norm0.weight"].tolist() == [1.0] * 64
    assert not weights["features.norm5.bias"].any() and not weights["features.norm5.running_mean"].any()
    assert (weights["features.transition2.norm.running_var"] == 1.0).all()
    assert weights["features.denseblock3.denselayer7.norm2.num_batches_tracked"].dtype == np.int64
    assert not weights["classifier.bias"].any()
    conv = weights["features.denseblock3.denselayer7.conv1.weight"]  # 128 x 448 x 1 x 1
    assert conv.dtype == np.float32
    assert conv.std() == pytest.approx(math.sqrt(2.0 / 448), rel=0.02)  # He: a ReLU follows
    assert weights["classifier.weight"].std() == pytest.approx(math.sqrt(1.0 / 1024), rel=0.05)  # LeCun: logits


def test_another_seed_gives_other_weights(registry: Registry) -> None:
    fraud = registry["fraud"]

    original = generate_weights(fraud)["layers.0.weight"]
    reseeded = generate_weights(fraud.model_copy(update={"weights_seed": 31}))["layers.0.weight"]

    assert not np.array_equal(original, reseeded)


def test_a_written_file_reads_back_through_safetensors(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "fraud.safetensors"

    sha256 = write_weights(registry["fraud"], path)

    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with safetensors.safe_open(path, framework="np") as file:
        assert file.metadata() == {"inferq.model": "fraud", "inferq.version": "0.1.0", "inferq.trained": "false"}
    read_back = safetensors.numpy.load_file(path)
    for key, expected in generate_weights(registry["fraud"]).items():
        np.testing.assert_array_equal(read_back[key], expected)


# --- checksums


def test_a_flipped_byte_is_a_checksum_mismatch(registry: Registry, settings: Settings, tmp_path: Path) -> None:
    spec = registry["fraud"]
    copy = tmp_path / spec.weights
    shutil.copyfile(settings.resolve_weights(spec.weights), copy)
    data = bytearray(copy.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's values: still a readable safetensors file
    copy.write_bytes(bytes(data))
    tampered_settings = Settings(registry_path=DEFAULT_REGISTRY_PATH, models_dir=tmp_path)

    with pytest.raises(ChecksumMismatch) as raised:
        verify_checksum(spec, copy)
    with pytest.raises(ChecksumMismatch):
        load_model(spec, tampered_settings, CPU)

    message = str(raised.value)
    for part in (spec.sha256, file_sha256(copy), str(copy), "scripts/make_weights.py", "registry"):
        assert part in message


def test_a_missing_file_is_a_load_error_that_says_how_to_make_it(registry: Registry, tmp_path: Path) -> None:
    spec = registry["chest-xray"]
    empty_settings = Settings(registry_path=DEFAULT_REGISTRY_PATH, models_dir=tmp_path)

    with pytest.raises(ModelLoadError, match=re.escape("python scripts/make_weights.py")) as raised:
        verify_checksum(spec, tmp_path / spec.weights)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(spec, empty_settings, CPU)

    assert not isinstance(raised.value, ChecksumMismatch)


def test_ensure_generated_weights_never_overwrites_an_existing_file(registry: Registry, tmp_path: Path) -> None:
    spec = registry["fraud"]
    (tmp_path / spec.weights).write_bytes(b"someone else's file")

    with pytest.raises(ChecksumMismatch):
        ensure_generated_weights(spec, Settings(registry_path=DEFAULT_REGISTRY_PATH, models_dir=tmp_path))

    assert (tmp_path / spec.weights).read_bytes() == b"someone else's file"


def test_ensure_generated_weights_only_verifies_a_model_it_does_not_generate(
    registry: Registry, settings: Settings, tmp_path: Path
) -> None:
    spec = registry["fraud"].model_copy(update={"weights_seed": None})

    assert ensure_generated_weights(spec, settings) == settings.resolve_weights(spec.weights)
    with pytest.raises(ModelLoadError, match="put the model's file there"):
        ensure_generated_weights(spec, Settings(registry_path=DEFAULT_REGISTRY_PATH, models_dir=tmp_path))


# --- loading


def test_the_chest_model_loads_frozen_in_eval_mode(chest_model: nn.Module) -> None:
    assert not any(module.training for module in chest_model.modules())
    assert not any(parameter.requires_grad for parameter in chest_model.parameters())
    assert all(parameter.device == CPU for parameter in chest_model.parameters())


def test_the_untrained_chest_model_gives_spread_probabilities(registry: Registry, chest_model: nn.Module) -> None:
    spec = registry["chest-xray"]

    with torch.inference_mode():
        probabilities = torch.sigmoid(chest_model(_chest_images(spec, count=2, seed=0)))
        other = torch.sigmoid(chest_model(_chest_images(spec, count=1, seed=1)))

    assert probabilities.shape == (2, len(spec.labels))
    assert torch.isfinite(probabilities).all()
    assert ((probabilities > 0.0) & (probabilities < 1.0)).all()
    # Neither vanished (every finding the same) nor exploded (everything pinned at 0 or 1).
    assert probabilities.std() > 0.05
    assert 0.2 < probabilities.mean() < 0.8
    assert ((probabilities > 0.02) & (probabilities < 0.98)).float().mean() > 0.8
    # The input still reaches the output through 121 layers.
    assert not torch.allclose(probabilities[0], other[0])


def test_the_fraud_model_scores_a_batch(registry: Registry, settings: Settings) -> None:
    model = load_model(registry["fraud"], settings, CPU)

    with torch.inference_mode():
        logits = model(torch.randn(5, 30, generator=torch.Generator().manual_seed(0)))

    assert logits.shape == (5, 1)
    assert torch.isfinite(logits).all()


def test_a_torchscript_archive_is_refused_by_the_registry() -> None:
    # Its module and weights are pickles (data.pkl): no loader is ever handed one.
    model = {"version": "1", "format": "torchscript", "weights": "m.pt", "sha256": "0" * 64, "trained": False}
    model["input"] = {"kind": "tensor", "shape": [-1, 3]}
    with pytest.raises(ConfigError, match=r"torchscript.*pickles.*torch\.export\.save"):
        parse_registry({"models": {"m": model}})


def test_a_torch_export_archive_loads_and_answers_like_its_source(tmp_path: Path) -> None:
    source, batch = _tiny_module(), torch.randn(4, 6)
    batch_size = torch.export.Dim("batch_size", min=1, max=1024)
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(source, (batch,), dynamic_shapes=({0: batch_size},)), path)

    model = load_model(_tiny_spec(path, "torch-export"), Settings(models_dir=tmp_path), CPU)

    assert not any(module.training for module in model.modules())
    assert not any(parameter.requires_grad for parameter in model.parameters())
    with torch.inference_mode():
        torch.testing.assert_close(model(batch), source(batch), rtol=0, atol=0)
        assert model(batch[:3]).shape == (3, 2)


@pytest.mark.parametrize("change", ["drop", "add"])
def test_safetensors_with_a_missing_or_extra_key_fail_to_load(registry: Registry, tmp_path: Path, change: str) -> None:
    spec = registry["fraud"]
    weights = generate_weights(spec)
    if change == "drop":
        del weights["layers.2.bias"]
    else:
        weights["layers.9.weight"] = np.zeros((2, 2), dtype=np.float32)
    path = tmp_path / "changed.safetensors"
    safetensors.numpy.save_file(weights, path)

    with pytest.raises(ModelLoadError, match="layers") as raised:
        load_model(_copy_spec(spec, path), Settings(models_dir=tmp_path), CPU)

    assert not isinstance(raised.value, ChecksumMismatch)


def test_a_file_of_another_format_fails_to_load(registry: Registry, settings: Settings) -> None:
    safetensors_path = settings.resolve_weights(registry["fraud"].weights)
    spec = _tiny_spec(safetensors_path, "torch-export")

    with pytest.raises(ModelLoadError, match="torch-export"):
        load_model(spec, settings, CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_format", ["safetensors", "torch-export"])
def test_every_format_loads_onto_a_gpu(
    registry: Registry, settings: Settings, tmp_path: Path, model_format: ModelFormat
) -> None:
    cuda = torch.device("cuda")
    source, batch = _tiny_module(), torch.randn(4, 6)
    if model_format == "safetensors":
        spec = registry["fraud"]
        source, batch = load_model(spec, settings, CPU), torch.randn(4, 30)
    else:
        torch.export.save(torch.export.export(source, (batch,)), tmp_path / "tiny.pt2")
        spec = _tiny_spec(tmp_path / "tiny.pt2", model_format)

    model = load_model(spec, settings, cuda)

    assert all(parameter.device.type == "cuda" for parameter in model.parameters())
    with torch.inference_mode():
        torch.testing.assert_close(model(batch.to(cuda)).cpu(), source(batch), rtol=1e-4, atol=1e-5)
