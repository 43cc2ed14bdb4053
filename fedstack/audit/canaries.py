"""Audit-mode canaries: examples put into clients' training data with probability 1/2 each.

Why canaries and not ordinary records: the one-run audit (`fedstack.audit.one_run`) needs m
records whose inclusion is an independent fair coin that the auditor knows and the model
must not. Ordinary records cannot be left out at random without changing the task; canaries
are extra records that are easy to recognise in the model when they were trained on
(mislabelled real images, or out-of-distribution inputs with a random label), which makes
the audit strong.

The inclusion bits are the audit secret: derived from a 256-bit key from the OS's CSPRNG
(`secrets`) with the AES-256-CTR PRG (`fedstack.crypto.prg`), never from the run's seed.
Whoever creates the run keeps the plan (key, bits, holders) in the run directory
(`CANARY_FILE`) for the audit and states in the privacy report that canaries were in; the
clients that hold canaries learn the key through the audit-mode run config. The canaries'
*content* is not secret (it is a function of a public seed and, for mislabelled canaries,
of examples no client trains on), only which of them went in.

This is for audit runs only: a canary is a record the data owner did not have.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from fedstack.crypto.prg import PRG_KEY_BYTES, expand_bytes
from fedstack.task.contract import Partition

#: Run-directory file holding the canary plan (the audit secret).
CANARY_FILE = "audit_canaries.json"
#: Version tag of that file.
CANARY_FORMAT = 1
#: Real examples (kept out of every client's data) with a label that is certainly wrong.
MISLABELLED = "mislabelled"
#: Uniform random inputs in the data's value range with a random label.
OUT_OF_DISTRIBUTION = "ood"
CANARY_KINDS: tuple[str, ...] = (MISLABELLED, OUT_OF_DISTRIBUTION)


@dataclass(frozen=True)
class CanarySet:
    """The canaries' inputs and labels (public: built from a public seed)."""

    inputs: np.ndarray
    labels: np.ndarray
    kind: str

    def __len__(self) -> int:
        return len(self.labels)


def make_canaries(
    kind: str,
    m: int,
    num_classes: int,
    seed: int,
    *,
    source_inputs: np.ndarray | None = None,
    source_labels: np.ndarray | None = None,
    input_shape: Sequence[int] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> CanarySet:
    """m canaries of `kind`.

    `mislabelled`: the first m of a seed-shuffled `source` (examples no client trains on,
    e.g. the central test split), each relabelled to a uniformly chosen *other* class.
    `ood`: inputs uniform in `value_range` with shape `input_shape`, labels uniform.
    """
    if m < 1:
        raise ValueError(f"audit canaries: need m >= 1, got {m}")
    if num_classes < 2:
        raise ValueError(f"canaries need a classification task (>= 2 classes), got {num_classes}")
    rng = np.random.default_rng((seed, m))  # public content, not the secret
    if kind == MISLABELLED:
        if source_inputs is None or source_labels is None:
            raise ValueError("mislabelled canaries need source_inputs and source_labels")
        if len(source_labels) < m:
            raise ValueError(f"mislabelled canaries: {m} requested, {len(source_labels)} "
                             "source examples")
        pick = rng.permutation(len(source_labels))[:m]
        true = np.asarray(source_labels)[pick].astype(np.int64)
        shift = rng.integers(1, num_classes, size=m)  # never 0: the label is always wrong
        return CanarySet(np.asarray(source_inputs)[pick].astype(np.float32),
                         (true + shift) % num_classes, kind)
    if kind == OUT_OF_DISTRIBUTION:
        if input_shape is None:
            raise ValueError("ood canaries need input_shape")
        low, high = value_range
        inputs = rng.uniform(low, high, size=(m, *input_shape)).astype(np.float32)
        return CanarySet(inputs, rng.integers(0, num_classes, size=m).astype(np.int64), kind)
    raise ValueError(f"unknown canary kind {kind!r}; choose one of {CANARY_KINDS}")


def inclusion_bits(key: bytes, m: int) -> np.ndarray:
    """m independent fair coins from the AES-256-CTR keystream of `key` (True: included)."""
    if len(key) != PRG_KEY_BYTES:
        raise ValueError(f"canary key must be {PRG_KEY_BYTES} bytes, got {len(key)}")
    stream = np.frombuffer(expand_bytes(key, m), dtype=np.uint8)
    return (stream & 1).astype(bool)


@dataclass(frozen=True)
class CanaryPlan:
    """Which client holds which canary, and which canaries went in (the audit secret)."""

    key: bytes
    m: int
    kind: str
    #: Public seed of the canaries' content.
    content_seed: int
    #: Partition id holding each canary (it trains on it if included).
    holders: tuple[int, ...]

    @classmethod
    def create(cls, m: int, kind: str, holder_clients: Sequence[int], content_seed: int,
               key: bytes | None = None) -> CanaryPlan:
        """A fresh plan: canary i is held by holder_clients[i % len(holder_clients)]."""
        if not holder_clients:
            raise ValueError("audit canaries: name at least one client to hold them")
        if kind not in CANARY_KINDS:
            raise ValueError(f"unknown canary kind {kind!r}; choose one of {CANARY_KINDS}")
        key = secrets.token_bytes(PRG_KEY_BYTES) if key is None else key
        holders = tuple(int(holder_clients[i % len(holder_clients)]) for i in range(m))
        return cls(key=key, m=int(m), kind=kind, content_seed=int(content_seed), holders=holders)

    @property
    def included(self) -> np.ndarray:
        return inclusion_bits(self.key, self.m)

    def indices_of(self, partition_id: int, *, only_included: bool = True) -> np.ndarray:
        """Canary indices held by `partition_id` (by default only those that went in)."""
        mine = np.asarray(self.holders) == int(partition_id)
        if only_included:
            mine &= self.included
        return np.flatnonzero(mine)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CANARY_FORMAT, "key": self.key.hex(), "m": self.m, "kind": self.kind,
            "content_seed": self.content_seed, "holders": list(self.holders),
            "included": [bool(b) for b in self.included],
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> CanaryPlan:
        if record.get("format") != CANARY_FORMAT:
            raise ValueError(f"{CANARY_FILE}: format {record.get('format')!r} is not "
                             f"{CANARY_FORMAT}")
        plan = cls(key=bytes.fromhex(record["key"]), m=int(record["m"]), kind=str(record["kind"]),
                   content_seed=int(record["content_seed"]),
                   holders=tuple(int(h) for h in record["holders"]))
        if len(plan.holders) != plan.m:
            raise ValueError(f"{CANARY_FILE}: {len(plan.holders)} holders for m={plan.m}")
        stored = record.get("included")
        if stored is not None and list(map(bool, stored)) != list(plan.included):
            raise ValueError(f"{CANARY_FILE}: the stored inclusion bits do not match the key")
        return plan


def save_plan(run_dir: Path | str, plan: CanaryPlan) -> Path:
    path = Path(run_dir) / CANARY_FILE
    path.write_text(json.dumps(plan.to_json(), indent=1))
    return path


def load_plan(run_dir: Path | str) -> CanaryPlan:
    return CanaryPlan.from_json(json.loads((Path(run_dir) / CANARY_FILE).read_text()))


def insert_canaries(partition: Partition, plan: CanaryPlan, canaries: CanarySet,
                    partition_id: int) -> Partition:
    """`partition` with this client's included canaries appended to its training set.

    The hook the task-loading path calls in audit mode only. Validation data is untouched.
    Works on what a task's loader returns: a pair of arrays, or a torch Dataset.
    """
    if len(canaries) != plan.m:
        raise ValueError(f"canary plan has m={plan.m} but {len(canaries)} canaries were built")
    index = plan.indices_of(partition_id)
    if len(index) == 0:
        return partition
    x_new, y_new = canaries.inputs[index], canaries.labels[index]
    train = partition.train
    if isinstance(train, tuple | list) and len(train) == 2 and not isinstance(train, Dataset):
        x_old, y_old = (np.asarray(v) for v in train)
        merged: Any = (np.concatenate([x_old, x_new.astype(x_old.dtype)]),
                       np.concatenate([y_old, y_new.astype(y_old.dtype)]))
    else:
        merged = ConcatDataset([train, TensorDataset(torch.from_numpy(x_new),
                                                     torch.from_numpy(y_new))])
    return Partition(train=merged, val=partition.val)


# --------------------------------------------------------------------------- a run's canaries
#: Quantile of |input| over the task's pool that bounds ood canaries' values: canaries as
#: large as ordinary inputs, but centred (zero-mean random inputs are nearly orthogonal to
#: each other, so each one's influence on the model is its own).
OOD_RANGE_QUANTILE = 0.99


def canaries_of_run(cfg: Any, plan: CanaryPlan) -> CanarySet:
    """The canaries of a run of a built-in task (the same on the server and every client).

    Mislabelled canaries come from the central test split, which no client trains on.
    """
    from fedstack.task.builtin import BUILTIN_TASKS
    from fedstack.task.datasets import load_task_data

    if str(cfg.task.name) not in BUILTIN_TASKS:
        raise ValueError(f"audit canaries support the built-in tasks {BUILTIN_TASKS}, not "
                         f"task={cfg.task.name}")
    data = load_task_data(cfg.task, int(cfg.seed))
    if plan.kind == MISLABELLED:
        return make_canaries(plan.kind, plan.m, data.num_classes, plan.content_seed,
                             source_inputs=data.x_test, source_labels=data.y_test)
    bound = float(np.quantile(np.abs(np.asarray(data.x_train)), OOD_RANGE_QUANTILE)) or 1.0
    return make_canaries(plan.kind, plan.m, data.num_classes, plan.content_seed,
                         input_shape=tuple(np.asarray(data.x_train).shape[1:]),
                         value_range=(-bound, bound))


def plan_from_config(cfg: Any) -> CanaryPlan | None:
    """The run's canary plan from its audit settings; None when audit canaries are off.

    Reads `audit.canaries` (m; 0 or absent: off), `audit.canary_kind`,
    `audit.canary_holders` (partition ids; null: every client) and `audit.canary_key`
    (hex, set by the server when it creates the run, like `run_id`).
    """
    audit = cfg.get("audit") if hasattr(cfg, "get") else getattr(cfg, "audit", None)
    m = int(_setting(audit, "canaries", 0) or 0)
    if m <= 0:
        return None
    key = _setting(audit, "canary_key", None)
    if not key:
        raise ValueError("audit.canaries is set but audit.canary_key is not: the server sets "
                         "it when it creates the run")
    holders = _setting(audit, "canary_holders", None)
    holders = list(range(int(cfg.num_clients))) if not holders else [int(h) for h in holders]
    return CanaryPlan.create(m, str(_setting(audit, "canary_kind", OUT_OF_DISTRIBUTION)),
                             holders, content_seed=int(cfg.seed), key=bytes.fromhex(str(key)))


def with_canaries(cfg: Any, partition_id: int, partition: Partition) -> Partition:
    """The client's hook: its partition, plus its included canaries in audit mode."""
    plan = plan_from_config(cfg)
    if plan is None:
        return partition
    return insert_canaries(partition, plan, canaries_of_run(cfg, plan), partition_id)


def _setting(section: Any, key: str, default: Any) -> Any:
    if section is None:
        return default
    value = section.get(key, default) if hasattr(section, "get") else getattr(section, key,
                                                                                default)
    return default if value is None else value
