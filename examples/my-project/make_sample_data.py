"""Write a small sample image folder, so the project runs before you bring your own data.

    python make_sample_data.py data        # data/<class>/<n>.png, RGB 32x32, 3 classes

Each class is a colour pattern plus noise: easy to learn, and no download.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circles", "stripes", "squares")
SIZE = 32


def pattern(name: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cy, cx = rng.integers(10, SIZE - 10, size=2)
    if name == "circles":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 64
        colour = (220, 60, 60)
    elif name == "stripes":
        mask = (xx + int(cx)) % 8 < 4
        colour = (60, 200, 60)
    else:
        mask = (abs(yy - cy) < 7) & (abs(xx - cx) < 7)
        colour = (60, 60, 220)
    image = rng.normal(90, 30, size=(SIZE, SIZE, 3))
    image[mask] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for name in CLASSES:
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            Image.fromarray(pattern(name, rng)).save(folder / f"{i:04d}.png")
    print(f"wrote {len(CLASSES) * args.per_class} images to {args.out}")


if __name__ == "__main__":
    main()
