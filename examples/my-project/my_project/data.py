"""Your data loader: a folder of image files, one sub-folder per class.

    data/
      cat/001.png  cat/002.jpg ...
      dog/001.png ...

Images are read as RGB at their own size (all images must share one size, or set
`+task.options.image_size=N` to resize them). Nothing is copied or sent anywhere: each
client reads its own files.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

#: File endings read as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@functools.lru_cache(maxsize=4)
def list_images(data_dir: str) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """(image paths, class index of each, class names) of a folder, in a fixed order.

    Cached: a simulated client serves many rounds in one process.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} is not a directory")
    classes = tuple(sorted(d.name for d in root.iterdir()
                           if d.is_dir() and not d.name.startswith(".")))
    if len(classes) < 2:
        raise ValueError(f"{root} needs one sub-folder per class (found {len(classes)})")
    paths: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(p) for p in files]
        labels += [index] * len(files)
    if not paths:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return tuple(paths), np.asarray(labels, dtype=np.int64), classes


class ImageFiles(Dataset):
    """(image tensor (3, H, W) in [0, 1], class index) for each file, read on access."""

    def __init__(self, paths: list[str], labels: np.ndarray, image_size: int | None) -> None:
        self.paths = list(paths)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[index]) as img:
            img = img.convert("RGB")
            if self.image_size is not None:
                img = img.resize((self.image_size, self.image_size))
            pixels = np.asarray(img, dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), self.labels[index]
