"""Aggregation strategies (server side) and their client-side protocol mods.

Each aggregation is chosen by `aggregation.name`; its strategy class is imported lazily so that
a plain FedAvg run never imports the crypto stacks.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

#: Strategy class of every aggregation, by dotted path.
STRATEGY_CLASSES: dict[str, str] = {
    "fedavg": "fedstack.strategies.fedavg:WeightedFedAvg",
    "secagg": "fedstack.strategies.secagg.strategy:SecAggFedAvg",
    "he": "fedstack.strategies.he.strategy:HEFedAvg",
}
#: A DP layer that is itself a strategy over an aggregation's, by (aggregation, dp).
#: dp=central: the server clips each update and noises the sum.
DP_STRATEGY_CLASSES: dict[tuple[str, str], str] = {
    ("fedavg", "central"): "fedstack.privacy.central_strategy:CentralDPFedAvg",
    ("secagg", "distributed"): "fedstack.privacy.distributed.strategy:DistributedDPSecAgg",
}


def load_object(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_strategy(cfg: Any, run_dir: Path) -> Any:
    """The configured strategy. Subclasses with options implement `from_config`."""
    aggregation = str(cfg.aggregation.name)
    cls = load_object(DP_STRATEGY_CLASSES.get((aggregation, str(cfg.dp.name)),
                                              STRATEGY_CLASSES[aggregation]))
    common = {
        "fraction_train": float(cfg.fraction_train),
        "fraction_evaluate": float(cfg.fraction_evaluate),
        "min_train_nodes": int(cfg.min_train_nodes),
        "min_evaluate_nodes": int(cfg.min_evaluate_nodes),
        "min_valid_replies": int(cfg.min_valid_replies),
        "max_num_examples": int(cfg.max_num_examples),
        "timeout": float(cfg.round_timeout),
        "seed": int(cfg.seed),
    }
    from_config = getattr(cls, "from_config", None)
    if from_config is not None:
        return from_config(cfg, run_dir=run_dir, **common)
    return cls(**common)
