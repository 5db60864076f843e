"""A multilayer perceptron over a feature vector: Linear-ReLU per hidden width, then a linear head giving logits."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from torch import Tensor, nn


class MLP(nn.Module):
    """`layers.0` .. `layers.2N` in a `Sequential`: N hidden Linear+ReLU pairs and one output Linear."""

    def __init__(self, *, in_features: int, hidden: Sequence[int], num_outputs: int) -> None:
        super().__init__()
        widths = [in_features, *hidden, num_outputs]
        if any(width <= 0 for width in widths):
            raise ValueError(
                f"in_features, hidden widths and num_outputs must be positive, got {in_features}, "
                f"{list(hidden)} and {num_outputs}"
            )
        layers: list[nn.Module] = []
        for fan_in, fan_out in pairwise(widths[:-1]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)
