"""A small CNN for 8x8 images (scikit-learn's digits): conv -> conv -> fc, with DFA feedback points.

``h = self.dfa.point(h)`` after each convolution's ReLU, ``self.dfa(logits)`` at the output, as in
every zoo model: the same network trains with any method of the family (the layer-wise ones
convert its two convolutions and its linear layer, see :mod:`dfa_kernels.zoo.family`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk


class DigitsCNN(nn.Module):
    """[N, 1, 8, 8] -> conv 3x3 (channels[0]) -> ReLU -> conv 3x3 stride 2 (channels[1]) -> ReLU ->
    flatten -> linear -> [N, classes] logits."""

    def __init__(
        self, channels: tuple[int, int] = (16, 32), classes: int = 10, side: int = 8, mode: str = "dfa", seed: int = 0
    ):
        super().__init__()
        if len(channels) != 2 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"channels must be two positive ints; got {channels!r}")
        self.conv1 = nn.Conv2d(1, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1)
        self.fc = nn.Linear(channels[1] * ((side + 1) // 2) ** 2, classes)
        self.dfa = dk.DFA(mode=mode, seed=seed)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dfa.point(F.relu(self.conv1(x)))
        return self.dfa.point(F.relu(self.conv2(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dfa(self.fc(self.features(x).flatten(1)))
