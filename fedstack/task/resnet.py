"""ResNet-18 with GroupNorm: the realistic-size model (≈ 11.2M parameters) for 32x32 images.

Why this variant: it is the model people train on CIFAR-shaped data (the CIFAR stem: one 3x3
convolution, no max-pool, so 32x32 inputs keep their resolution through the first stage),
and it is DP-SGD-ready as built, which is what lets every privacy layer run on it unchanged:
- GroupNorm instead of BatchNorm: BatchNorm mixes the examples of a batch (per-example
  clipping cannot bound one example's influence) and keeps running statistics.
- No in-place operations (`ReLU()`, `out = out + shortcut`): backward hooks that record
  per-example activations need the tensors they saw.
- Convolutions with zero padding and groups=1, GroupNorm and Linear only: every layer has a
  per-sample gradient formula in each of fedstack's clipping modes (`bk` included).
"""

from __future__ import annotations

import torch
from torch import nn

#: Channels of the four stages and blocks per stage (ResNet-18: 2-2-2-2).
STAGE_CHANNELS: tuple[int, ...] = (64, 128, 256, 512)
BLOCKS_PER_STAGE: tuple[int, ...] = (2, 2, 2, 2)
#: GroupNorm groups (32, as in Wu & He 2018); every stage's width is a multiple of it.
GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(GROUPS, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projected when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()
        # Zero-initialised last scale ("zero-gamma", Goyal et al. 2017): every block starts
        # as the identity, so the un-normalised-by-batch network trains stably from scratch.
        nn.init.zeros_(self.norm2.weight)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                group_norm(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 (CIFAR stem) with GroupNorm, for (C, H, W) images of any channel count.

    ≈ 11.17M parameters for 3x32x32 inputs and 10 classes (the count does not depend on
    the image size: global average pooling precedes the classifier).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"resnet18_gn needs image inputs (C, H, W), got shape {tuple(input_shape)}"
            )
        channels = int(input_shape[0])
        width = STAGE_CHANNELS[0]
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False),
            group_norm(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        for index, (out_channels, blocks) in enumerate(
            zip(STAGE_CHANNELS, BLOCKS_PER_STAGE, strict=True)
        ):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(width, out_channels, stride if block == 0 else 1))
                width = out_channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.stages(self.stem(x)))
        return self.classifier(torch.flatten(out, 1))
