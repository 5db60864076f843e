"""The built-in architectures a registry entry with `format = "safetensors"` can name, and the one builder."""

from __future__ import annotations

from torch import nn

from inferq.protocol.errors import ModelLoadError
from inferq.protocol.registry import ImageInput, ModelSpec
from inferq.workers.architectures.densenet import DenseNet121
from inferq.workers.architectures.mlp import MLP

__all__ = ["MLP", "DenseNet121", "build_architecture"]


def _num_outputs(spec: ModelSpec) -> int:
    # A model without labels answers one score (a regression value or a single probability).
    return len(spec.labels) or 1


def _build_densenet121(spec: ModelSpec) -> nn.Module:
    in_channels: int
    if isinstance(spec.input, ImageInput):
        in_channels = spec.input.channels
    elif len(spec.input.shape) == 4 and spec.input.shape[1] > 0:
        in_channels = spec.input.shape[1]  # a tensor input laid out (batch, channels, height, width)
    else:
        raise ModelLoadError(
            f"model {spec.name!r}: densenet121 needs an image input or a tensor input shaped "
            f"(batch, channels, height, width), got shape {spec.input.shape}"
        )
    return DenseNet121(in_channels=in_channels, num_classes=_num_outputs(spec))


def _build_mlp(spec: ModelSpec) -> nn.Module:
    assert spec.architecture is not None  # checked by build_architecture
    if isinstance(spec.input, ImageInput) or spec.input.shape[-1] <= 0:
        raise ModelLoadError(
            f"model {spec.name!r}: mlp needs a tensor input with a fixed last dimension, got {spec.input}"
        )
    return MLP(in_features=spec.input.shape[-1], hidden=spec.architecture.hidden, num_outputs=_num_outputs(spec))


_BUILDERS = {"densenet121": _build_densenet121, "mlp": _build_mlp}


def build_architecture(spec: ModelSpec) -> nn.Module:
    """The untrained module the registry entry names, sized from its input and labels, on the current device."""
    if spec.architecture is None:
        raise ModelLoadError(f"model {spec.name!r} names no [architecture] to build")
    return _BUILDERS[spec.architecture.name](spec)
