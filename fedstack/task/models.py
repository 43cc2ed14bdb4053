"""Models of the built-in tasks.

All models avoid BatchNorm so that DP-SGD (per-sample gradients) applies to them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedstack.task.model_names import MODEL_NAMES
from fedstack.task.resnet import ResNet18GN


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and a small classifier for 8x8 grayscale digits (~85k parameters)."""

    #: (first conv channels, second conv channels, hidden units)
    widths: tuple[int, int, int] = (32, 64, 64)

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        c1, c2, hidden = self.widths
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * (height // 2) * (width // 2), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallDigitsCNN(DigitsCNN):
    """A ~10k-parameter CNN for 8x8 digits: DP-SGD's noise grows with the parameter count,
    so a small model keeps far more accuracy at a given ε (used by the privacy sweeps)."""

    widths = (8, 16, 32)


class DigitsLinear(nn.Module):
    """Multinomial logistic regression on the flattened pixels (64 x 10 + 10 = 650 parameters).

    Why it exists: the DP model. DP-SGD adds Gaussian noise of norm ~ sigma * C * sqrt(d) to
    every step, so with d = 650 instead of the CNN's 85k the noise is ~11x smaller against the
    same clipped signal, and a convex model tolerates noisy, clipped steps well (Tramer & Boneh
    2021: under DP, linear models on good features beat end-to-end deep nets; digits' pixels
    are such features). With ~230 training examples per client it keeps accuracy at eps = 8
    within a few points of its own non-private accuracy (benchmarks/dp.py --utility, docs/dp.md),
    where the CNN loses 20+. Only a Linear layer: every per-sample clipping mode supports it.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        features = 1
        for size in input_shape:
            features *= size
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TabularMLP(nn.Module):
    """A two-hidden-layer MLP for standardised tabular features."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        (in_features,) = input_shape
        self.net = nn.Sequential(
            nn.Linear(in_features, 64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ImageCNN(DigitsCNN):
    """The digits CNN for small images of any size and channel count (`task=hf` images)."""


ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]

#: Model names accepted by `task.model`.
MODEL_BUILDERS: dict[str, ModelBuilder] = {
    "digits_cnn": DigitsCNN,
    "digits_cnn_small": SmallDigitsCNN,
    "digits_linear": DigitsLinear,
    "tabular_mlp": TabularMLP,
    "image_cnn": ImageCNN,
    "resnet18_gn": ResNet18GN,
}


if set(MODEL_BUILDERS) != set(MODEL_NAMES):  # pragma: no cover - import-time consistency
    raise ImportError("fedstack.task.model_names.MODEL_NAMES is out of date")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build a model whose initial weights depend only on `seed` (same on every party)."""
    if name == "auto":
        name = "image_cnn" if len(input_shape) == 3 else "tabular_mlp"
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_BUILDERS)}")
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return MODEL_BUILDERS[name](tuple(input_shape), num_classes)
    finally:
        torch.random.set_rng_state(generator_state)
