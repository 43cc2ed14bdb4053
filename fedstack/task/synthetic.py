"""Generated CIFAR-shaped data (`task=synthetic_cifar`): a realistic workload with no download.

Why generated: measuring the privacy layers at the sizes people train (ResNet-18, 3x32x32
images, 10 classes) must not depend on a download, and CI must be able to run a round of
it. The data is learnable, not noise: each class has a smooth random prototype image; an
example is its class's prototype, shifted by a few pixels (so the model has to learn
translation-tolerant features, as on real images), plus Gaussian pixel noise. Everything is
drawn from the run's seed, so every party generates the same arrays and no data travels.
"""

from __future__ import annotations

import numpy as np

#: Side of the coarse random grid a prototype is upsampled from (smooth, image-like).
PROTOTYPE_GRID = 4
#: Largest shift (pixels, each direction) of an example against its class prototype.
MAX_SHIFT = 3


def _prototypes(rng: np.random.Generator, num_classes: int, channels: int, size: int) -> np.ndarray:
    """(K, C, size + 2*MAX_SHIFT, same) smooth class prototypes, unit variance."""
    padded = size + 2 * MAX_SHIFT
    coarse = rng.standard_normal((num_classes, channels, PROTOTYPE_GRID, PROTOTYPE_GRID))
    # Bilinear upsampling of the coarse grid: separable interpolation along each axis.
    points = np.linspace(0, PROTOTYPE_GRID - 1, padded)
    low = np.clip(np.floor(points).astype(int), 0, PROTOTYPE_GRID - 2)
    frac = points - low
    rows = coarse[:, :, low, :] * (1 - frac)[:, None] + coarse[:, :, low + 1, :] * frac[:, None]
    protos = rows[:, :, :, low] * (1 - frac) + rows[:, :, :, low + 1] * frac
    protos -= protos.mean(axis=(1, 2, 3), keepdims=True)
    protos /= protos.std(axis=(1, 2, 3), keepdims=True)
    return protos.astype(np.float32)


def generate_images(
    num_samples: int, num_classes: int, channels: int, size: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): `num_samples` images (N, C, size, size) float32 and balanced int64 labels."""
    if num_samples < num_classes:
        raise ValueError(f"num_samples={num_samples} is fewer than num_classes={num_classes}")
    rng = np.random.default_rng((seed, num_samples, num_classes, channels, size))
    protos = _prototypes(rng, num_classes, channels, size)
    y = rng.permutation(np.arange(num_samples) % num_classes).astype(np.int64)
    shifts = rng.integers(0, 2 * MAX_SHIFT + 1, size=(num_samples, 2))
    x = np.empty((num_samples, channels, size, size), dtype=np.float32)
    for dy in range(2 * MAX_SHIFT + 1):
        for dx in range(2 * MAX_SHIFT + 1):
            rows = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            if len(rows):
                x[rows] = protos[y[rows], :, dy : dy + size, dx : dx + size]
    x += (noise * rng.standard_normal(x.shape)).astype(np.float32)
    return x, y
