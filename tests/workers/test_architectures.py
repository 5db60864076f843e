"""The built-in architectures: DenseNet-121 laid out as torchvision's, the MLP, and the registry builder."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
import torch

from inferq.config.settings import DEFAULT_REGISTRY_PATH
from inferq.protocol.errors import ModelLoadError
from inferq.protocol.registry import ArchitectureSpec, ImageInput, ModelSpec, TensorInput, load_registry
from inferq.workers.architectures import MLP, DenseNet121, build_architecture
from inferq.workers.architectures.densenet import DenseBlock

# torchvision's published figures for densenet121 (3 channels, 1000 ImageNet classes).
TORCHVISION_DENSENET121_PARAMETERS = 7_978_856
TORCHVISION_DENSENET121_FEATURE_PARAMETERS = 6_953_856
TORCHVISION_DENSENET121_STATE_KEYS = 727
# Ours: the 7x7 stem sees 1 channel instead of 3 (-64*2*7*7) and the head has 14 outputs instead of 1000.
CHEST_XRAY_PARAMETERS = TORCHVISION_DENSENET121_FEATURE_PARAMETERS - 64 * 2 * 7 * 7 + 1024 * 14 + 14

_TORCHVISION_KEY = re.compile(
    r"^(features\.(conv0\.weight|(norm0|norm5)\.\w+"
    r"|denseblock[1-4]\.denselayer\d+\.(conv[12]\.weight|norm[12]\.\w+)"
    r"|transition[1-3]\.(conv\.weight|norm\.\w+))"
    r"|classifier\.(weight|bias))$"
)


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _spec(**overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "name": "tiny",
        "version": "1",
        "weights": "tiny.safetensors",
        "sha256": "0" * 64,
        "trained": False,
        "architecture": ArchitectureSpec(name="mlp", hidden=(8,)),
        "input": TensorInput(shape=(-1, 5)),
        "labels": ("a", "b"),
    }
    return ModelSpec(**(fields | overrides))


@pytest.fixture(scope="module")
def chest_spec() -> ModelSpec:
    return load_registry(DEFAULT_REGISTRY_PATH)["chest-xray"]


def test_densenet121_has_torchvisions_parameter_count() -> None:
    with torch.device("meta"):
        model = DenseNet121(in_channels=3, num_classes=1000)

    assert _parameter_count(model) == TORCHVISION_DENSENET121_PARAMETERS
    assert _parameter_count(model.features) == TORCHVISION_DENSENET121_FEATURE_PARAMETERS
    assert len(model.state_dict()) == TORCHVISION_DENSENET121_STATE_KEYS


def test_chest_xray_densenet_is_sized_from_the_registry(chest_spec: ModelSpec) -> None:
    with torch.device("meta"):
        model = build_architecture(chest_spec)

    assert isinstance(model, DenseNet121)
    assert _parameter_count(model) == CHEST_XRAY_PARAMETERS == 6_961_934


def test_densenet121_state_keys_follow_torchvisions_names(chest_spec: ModelSpec) -> None:
    with torch.device("meta"):
        shapes = {key: tuple(value.shape) for key, value in build_architecture(chest_spec).state_dict().items()}

    assert [key for key in shapes if not _TORCHVISION_KEY.match(key)] == []
    assert shapes["features.conv0.weight"] == (64, 1, 7, 7)
    assert shapes["features.denseblock1.denselayer1.norm1.weight"] == (64,)
    assert shapes["features.denseblock1.denselayer1.norm1.num_batches_tracked"] == ()
    assert shapes["features.denseblock1.denselayer1.conv1.weight"] == (128, 64, 1, 1)
    assert shapes["features.transition1.conv.weight"] == (128, 256, 1, 1)
    assert shapes["features.transition3.conv.weight"] == (512, 1024, 1, 1)
    assert shapes["features.denseblock4.denselayer16.conv1.weight"] == (128, 512 + 15 * 32, 1, 1)
    assert shapes["features.denseblock4.denselayer16.conv2.weight"] == (32, 128, 3, 3)
    assert shapes["features.norm5.running_var"] == (1024,)
    assert shapes["classifier.weight"] == (14, 1024)
    assert shapes["classifier.bias"] == (14,)


def test_densenet121_blocks_have_6_12_24_16_layers() -> None:
    with torch.device("meta"):
        keys = DenseNet121().state_dict().keys()

    layers = {
        match.groups() for key in keys if (match := re.match(r"features\.denseblock(\d)\.denselayer(\d+)\.", key))
    }
    per_block = Counter(block for block, _ in layers)
    assert [per_block[str(block)] for block in range(1, 5)] == [6, 12, 24, 16]


def test_densenet121_gives_one_logit_per_class_and_7x7_features() -> None:
    with torch.device("meta"):
        model = DenseNet121(in_channels=1, num_classes=14)
        images = torch.empty(3, 1, 224, 224)

        assert model.features(images).shape == (3, 1024, 7, 7)
        assert model(images).shape == (3, 14)


def test_a_dense_block_appends_each_layers_output_after_what_it_saw() -> None:
    # Real weights only work if channels are concatenated in torchvision's order: block input first, then layer 1..N.
    block = DenseBlock(num_layers=2, in_channels=4, growth_rate=3, bottleneck_factor=2).eval()
    block_input = torch.randn(2, 4, 5, 5)

    with torch.no_grad():
        output = block(block_input)
        first = block["denselayer1"](block_input)
        second = block["denselayer2"](torch.cat([block_input, first], dim=1))

    torch.testing.assert_close(output, torch.cat([block_input, first, second], dim=1), rtol=0, atol=0)


def test_the_classifier_sees_relu_of_norm5_pooled() -> None:
    model = DenseNet121(in_channels=1, num_classes=3).eval()
    norm5 = model.get_submodule("features.norm5")
    assert isinstance(norm5, torch.nn.BatchNorm2d)
    with torch.no_grad():
        # norm5 now outputs -1 everywhere: the ReLU turns that into zeros, leaving the classifier only its bias.
        norm5.weight.zero_()
        norm5.bias.fill_(-1.0)
        model.classifier.bias.copy_(torch.tensor([0.5, -0.25, 2.0]))

        logits = model(torch.randn(2, 1, 32, 32))

    torch.testing.assert_close(logits, torch.tensor([[0.5, -0.25, 2.0]] * 2), rtol=0, atol=0)


def test_mlp_layout_names_and_shapes() -> None:
    model = build_architecture(_spec(architecture=ArchitectureSpec(name="mlp", hidden=(64, 32)), labels=("fraud",)))

    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == {
        "layers.0.weight": (64, 5),
        "layers.0.bias": (64,),
        "layers.2.weight": (32, 64),
        "layers.2.bias": (32,),
        "layers.4.weight": (1, 32),
        "layers.4.bias": (1,),
    }
    assert isinstance(model, MLP)
    assert model(torch.zeros(7, 5)).shape == (7, 1)


def test_mlp_returns_logits_not_probabilities() -> None:
    model = build_architecture(_spec(architecture=ArchitectureSpec(name="mlp", hidden=())))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(10.0)

    assert model(torch.ones(1, 5)).min() > 1.0


def test_a_model_without_labels_gets_one_output() -> None:
    model = build_architecture(_spec(labels=()))

    assert model(torch.zeros(2, 5)).shape == (2, 1)


def test_densenet_accepts_a_tensor_input_laid_out_nchw() -> None:
    spec = _spec(architecture=ArchitectureSpec(name="densenet121"), input=TensorInput(shape=(-1, 3, 224, 224)))
    with torch.device("meta"):
        model = build_architecture(spec)

    assert model.state_dict()["features.conv0.weight"].shape == (64, 3, 7, 7)


@pytest.mark.parametrize(
    ("architecture", "model_input"),
    [
        (ArchitectureSpec(name="mlp"), ImageInput(height=8, width=8)),
        (ArchitectureSpec(name="mlp"), TensorInput(shape=(2, -1))),
        (ArchitectureSpec(name="densenet121"), TensorInput(shape=(-1, 30))),
    ],
)
def test_an_architecture_refuses_an_input_it_cannot_take(
    architecture: ArchitectureSpec, model_input: ImageInput | TensorInput
) -> None:
    spec = _spec(architecture=architecture, input=model_input, labels=("a",))

    with pytest.raises(ModelLoadError, match="tiny"):
        build_architecture(spec)


def test_a_spec_without_architecture_cannot_be_built() -> None:
    spec = _spec(format="torch-export", architecture=None)

    with pytest.raises(ModelLoadError, match="no \\[architecture\\]"):
        build_architecture(spec)


@pytest.mark.parametrize("hidden", [(0,), (8, -1)])
def test_mlp_rejects_non_positive_widths(hidden: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(str(list(hidden)))):
        MLP(in_features=5, hidden=hidden, num_outputs=1)
