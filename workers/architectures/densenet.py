"""DenseNet-121 (Huang et al., 2017) laid out exactly as torchvision's `densenet121`, so real weights load by name.

CheXNet (Rajpurkar et al., 2017) is this network with one output per ChestX-ray14 finding. Keeping torchvision's
module names (`features.denseblock1.denselayer1.norm1.weight`, `features.transition1.conv.weight`,
`classifier.weight`, ...) lets a checkpoint converted to safetensors load with `strict=True`, without torchvision.
Checkpoints saved before torchvision 0.3 spell `norm.1` for `norm1` and need those keys renamed first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn import functional

GROWTH_RATE = 32
BLOCK_LAYERS = (6, 12, 24, 16)
BOTTLENECK_FACTOR = 4  # torchvision's bn_size: a layer's 1x1 conv widens to 4 x growth-rate channels
STEM_CHANNELS = 64
FEATURE_CHANNELS = 1024  # what the last dense block hands the classifier, for the numbers above


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 then BN-ReLU-conv3x3: `growth_rate` new channels computed from all the block's so far."""

    def __init__(self, *, in_channels: int, growth_rate: int, bottleneck_factor: int) -> None:
        super().__init__()
        bottleneck_channels = bottleneck_factor * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bottleneck_channels, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        bottleneck = self.conv1(self.relu1(self.norm1(features)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    """Layers named `denselayer1..N`; each sees the concatenation of the block's input and every earlier output."""

    def __init__(self, *, num_layers: int, in_channels: int, growth_rate: int, bottleneck_factor: int) -> None:
        super().__init__()
        for index in range(num_layers):
            layer = DenseLayer(
                in_channels=in_channels + index * growth_rate,
                growth_rate=growth_rate,
                bottleneck_factor=bottleneck_factor,
            )
            self.add_module(f"denselayer{index + 1}", layer)

    def forward(self, block_input: Tensor) -> Tensor:
        features = [block_input]
        for layer in self.values():
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1-avgpool between blocks: halves the channels and the resolution."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__(
            OrderedDict(
                norm=nn.BatchNorm2d(in_channels),
                relu=nn.ReLU(inplace=True),
                conv=nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                pool=nn.AvgPool2d(kernel_size=2, stride=2),
            )
        )


def _stem(in_channels: int) -> OrderedDict[str, nn.Module]:
    return OrderedDict(
        conv0=nn.Conv2d(in_channels, STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False),
        norm0=nn.BatchNorm2d(STEM_CHANNELS),
        relu0=nn.ReLU(inplace=True),
        pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


class DenseNet121(nn.Module):
    """`features` (stem, four dense blocks, three transitions, `norm5`) then a linear `classifier`; returns logits."""

    def __init__(self, *, in_channels: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        if in_channels <= 0 or num_classes <= 0:
            raise ValueError(f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}")
        self.features = nn.Sequential(_stem(in_channels))
        channels = STEM_CHANNELS
        for block_index, num_layers in enumerate(BLOCK_LAYERS, start=1):
            block = DenseBlock(
                num_layers=num_layers,
                in_channels=channels,
                growth_rate=GROWTH_RATE,
                bottleneck_factor=BOTTLENECK_FACTOR,
            )
            self.features.add_module(f"denseblock{block_index}", block)
            channels += num_layers * GROWTH_RATE
            if block_index < len(BLOCK_LAYERS):
                transition = Transition(in_channels=channels, out_channels=channels // 2)
                self.features.add_module(f"transition{block_index}", transition)
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        # norm5 has no ReLU of its own in torchvision's layout: it is applied here, before pooling.
        features = functional.relu(self.features(images))
        pooled = functional.adaptive_avg_pool2d(features, output_size=1)
        return self.classifier(torch.flatten(pooled, start_dim=1))
