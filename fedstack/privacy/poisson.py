"""Poisson-sampled mini-batches, the sampling DP-SGD's accounting assumes.

Why our own and not Opacus's DPDataLoader: the semantics are identical (every example is
included independently with probability q at every step; batches vary in size and may be
empty), but our client data are in-memory tensors, so indexing them directly avoids a
per-example collate. The randomness must be secret (see `secret_generator` and
`fedstack.privacy.secure_random`): a server that could replay the sampling or the noise
could undo the privacy.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from fedstack.privacy.secure_random import RandomSource, as_random_source


def secret_generator() -> torch.Generator:
    """A torch generator seeded from the OS's CSPRNG.

    Never derive DP noise or sampling from the run's seed: the server knows it. torch's
    generator itself is not cryptographically secure; ``dp.secure_rng=true`` replaces it
    with AES-256-CTR (`fedstack.privacy.secure_random`); see docs/dp.md.
    """
    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(63))
    return gen


def as_tensor_dataset(dataset: Dataset) -> TensorDataset:
    """Our tasks hand over TensorDatasets; anything else is stacked into one once."""
    if isinstance(dataset, TensorDataset):
        return dataset
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    if not items:
        raise ValueError("cannot train on an empty dataset")
    columns = list(zip(*items, strict=True))
    return TensorDataset(*(torch.stack([torch.as_tensor(v) for v in col]) for col in columns))


#: Largest inclusion mask (steps x examples) drawn at once; bounds the sampler's memory.
MAX_MASK_ELEMENTS = 1 << 22


class PoissonBatches:
    """Iterable over `steps` Poisson batches of `dataset` with sample rate `sample_rate`.

    Exposes ``dataset`` and ``len()`` like a DataLoader, so Opacus's ``make_private``
    (with ``poisson_sampling=False``) derives the same sample rate 1/len from it.
    """

    def __init__(
        self, dataset: Dataset, sample_rate: float, steps: int,
        generator: torch.Generator | RandomSource,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.dataset = as_tensor_dataset(dataset)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.random = as_random_source(generator)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        tensors = self.dataset.tensors
        n = len(tensors[0])
        # The inclusion draws of many steps are made at once (a steps x n mask, in chunks of
        # at most MAX_MASK_ELEMENTS): a handful of tensor ops per chunk instead of four per
        # step, which matters for small models where each op costs as much as its math.
        rows_per_chunk = max(1, MAX_MASK_ELEMENTS // max(n, 1))
        remaining = self.steps
        while remaining > 0:
            rows = min(remaining, rows_per_chunk)
            remaining -= rows
            mask = self.random.uniform((rows, n)) < self.sample_rate
            counts = mask.sum(1).tolist()
            # nonzero() lists (row, column) pairs in row-major order: each step's examples
            # form one contiguous run of the column indices.
            columns = mask.nonzero()[:, 1]
            for idx in columns.split(counts):
                yield tuple(t.index_select(0, idx) for t in tensors)
