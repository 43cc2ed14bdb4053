"""The task plug-in contract: what a task (yours or a built-in one) gives fedstack.

A task is a Python module (`task=custom task.module=my_project.task`) with these functions;
fedstack's own tasks (`digits`, `breast_cancer`, `hf`, `synthetic_cifar`) are such a module
too (`fedstack.task.builtin`), so every run goes through this one contract:

    def build_model(ctx: TaskContext) -> torch.nn.Module                        # required
    def load_partition(ctx: TaskContext, partition_id: int) -> Partition         # required
    def load_test(ctx: TaskContext) -> Examples | None                           # optional
    def loss(outputs: Tensor, targets: Tensor) -> Tensor  # per example, (B,)   # optional
    def label_names(ctx: TaskContext) -> Sequence[str] | None                    # optional

- `build_model` returns a fresh, untrained model. fedstack seeds torch with the run's seed
  around the call, so every party builds the same initial weights; the server's copy is the
  one that is trained, clients load the global weights into theirs. Under `dp=local` the
  model must pass the DP model check (`fedstack.privacy.engine.check_dp_model`: no
  BatchNorm, no tied weights, no in-place activations); the run is refused at start-up,
  naming the layer, otherwise.
- `load_partition` returns one client's local data: `Partition(train, val)` or a pair
  `(train, val)`. Each is `Examples`: a map-style torch `Dataset` whose items are
  `(input, target)`, or a pair `(inputs, targets)` of arrays/tensors with one row per
  example. `val` may be empty (no federated evaluation on that client). It is called on the
  client (with the node's `ctx.node_config`, e.g. where its files are) and, in simulation,
  by the server's start-up check for every partition (sizes, feasibility). It must be a pure
  function of (ctx, partition_id): the same call returns the same data.
- `load_test` returns the server's central test split, where the server may evaluate (None
  or absent: no central evaluation).
- `loss` maps (model outputs, targets) to one loss per example, shape (B,): DP-SGD clips
  per example, and training takes the mean. Default: cross-entropy.
- `label_names` says what each class index means (saved in the run directory).

Instead of a module, each function can be named by a dotted path (`task.model_fn`,
`task.partition_fn`, `task.test_fn`, `task.loss_fn`, e.g. `my_project.models:build`); a
path given that way wins over the module's function of the same role.

Helpers for loaders: `partition_pool` splits a dataset every party can read (one file, one
folder) into the run's partitions exactly as the built-in tasks do, `hold_out_test` carves
the central test split off it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

#: What a loader may return for a set of examples: a Dataset of (input, target) items, or
#: a pair (inputs, targets) of arrays / tensors with one row per example.
Examples = Dataset | tuple[Any, Any]


@dataclass(frozen=True)
class TaskContext:
    """What a task's functions get to know about the run (the same on every party).

    `settings` is the run's `task` config node (read-only): the training keys, and for
    `task=custom` the free-form `task.options` (also as the plain dict `options`).
    `node_config` is the calling node's own Flower node config (a client's, e.g. a
    `data-dir` its owner set with `flower-supernode --node-config`); empty on the server.
    """

    settings: Any
    seed: int
    num_partitions: int
    #: The run's `partition` group (scheme and its keys): what `partition_pool` follows.
    partition: Any
    node_config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def options(self) -> dict[str, Any]:
        """`task.options` as a plain dict ({} for tasks without options)."""
        from omegaconf import OmegaConf

        options = self.settings.get("options") if hasattr(self.settings, "get") else None
        if options is None:
            return {}
        if OmegaConf.is_config(options):
            return dict(OmegaConf.to_container(options, resolve=True))  # type: ignore[arg-type]
        return dict(options)


@dataclass(frozen=True)
class Partition:
    """One client's local data: training examples and validation examples (may be empty)."""

    train: Any
    val: Any


def as_dataset(examples: Any, what: str) -> Dataset:
    """A map-style Dataset of (input, target) from what a loader returned.

    Why: the trainers (plain and DP-SGD) and the evaluators take Datasets; arrays become
    TensorDatasets once here, so a loader can return whichever is natural. `what` names the
    loader and role for the error message.
    """
    if isinstance(examples, Dataset):
        if not hasattr(examples, "__len__"):
            raise TypeError(
                f"{what}: an iterable Dataset has no length; return a map-style "
                "Dataset (with __len__ and __getitem__) or (inputs, targets)"
            )
        return examples
    if isinstance(examples, tuple | list) and len(examples) == 2:
        inputs, targets = (
            _as_tensor(v, f"{what} {role}")
            for v, role in zip(examples, ("inputs", "targets"), strict=True)
        )
        if len(inputs) != len(targets):
            raise ValueError(f"{what}: {len(inputs)} inputs but {len(targets)} targets")
        return TensorDataset(inputs, targets)
    raise TypeError(
        f"{what}: expected a torch Dataset of (input, target) items or a pair "
        f"(inputs, targets), got {type(examples).__name__}"
    )


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)  # torch models default to float32 weights
    if array.dtype.kind not in "fiub":
        raise TypeError(f"{what}: dtype {array.dtype} is not numeric")
    return torch.from_numpy(np.ascontiguousarray(array))


def empty_like(dataset: Dataset) -> Dataset:
    """An empty dataset of the same kind (a client without validation examples)."""
    return Subset(dataset, [])


def per_example_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy of class logits, one value per example."""
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def hold_out_test(
    ctx: TaskContext, inputs: Any, targets: Any
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """((pool inputs, pool targets), (test inputs, test targets)): the central test split.

    Stratified by target, `task.test_fraction` of the examples, from the run's seed: every
    party that reads the same data carves the same split, so the server's test examples are
    never in a client's partition (the built-in tasks do exactly this).
    """
    from fedstack.task.datasets import split_examples

    x_pool, x_test, y_pool, y_test = split_examples(
        np.asarray(inputs), np.asarray(targets), float(ctx.settings.test_fraction), ctx.seed
    )
    return (x_pool, y_pool), (x_test, y_test)


def partition_pool(ctx: TaskContext, partition_id: int, inputs: Any, targets: Any) -> Partition:
    """Partition `partition_id` of a pool every party can read, with the run's scheme.

    The `partition` group (iid, dirichlet, shards; its seed-determined draw) picks the
    client's share of (inputs, targets), and `task.client_val_fraction` of that share is its
    validation set: the same code path as the built-in tasks, so `fedstack`'s start-up
    check and every client agree on every client's sizes.
    """
    from fedstack.task.client_data import split_partition
    from fedstack.task.partitioning import client_partition

    targets = np.asarray(targets)
    indices = client_partition(targets, partition_id, ctx.num_partitions, ctx.partition, ctx.seed)
    split = split_partition(
        indices, partition_id, ctx.seed, float(ctx.settings.client_val_fraction)
    )
    return Partition(
        train=_take(inputs, targets, split.train), val=_take(inputs, targets, split.val)
    )


def _take(inputs: Any, targets: np.ndarray, index: np.ndarray) -> tuple[Any, Any]:
    if isinstance(inputs, Sequence) and not isinstance(inputs, np.ndarray):
        return [inputs[i] for i in index], targets[index]
    return np.asarray(inputs)[index], targets[index]
