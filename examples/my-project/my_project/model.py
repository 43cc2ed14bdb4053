"""Your model: any torch.nn.Module.

To run under every privacy layer, including DP-SGD (`dp=local`), keep it clippable per
example: GroupNorm (or LayerNorm) instead of BatchNorm, no in-place activations, no weight
shared between two layers. fedstack checks this at start-up and names any layer it refuses.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three convolution blocks and a linear classifier, for RGB images of any size."""

    def __init__(self, channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_channels = channels
        for out_channels in (width, 2 * width, 4 * width):
            blocks += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.GroupNorm(4, out_channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
