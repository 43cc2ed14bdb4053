"""Run update inversion on a recorded server view and score it against the clients' data.

The attacker uses only the view (global model, observed weights, the example counts the
server saw); the truth (each client's training examples, the central test split as
held-out reference for the match threshold) is loaded from the run's config afterwards, to
score. Built-in tasks only (the audit re-derives their data from the run's seed).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedstack.audit.intervals import mean_interval, wilson_interval
from fedstack.audit.inversion import (
    MATCH_QUANTILE,
    InversionSettings,
    Score,
    class_confusion,
    invert,
    match_threshold,
    score,
    update_as_gradient,
)
from fedstack.audit.targets import KIND_AGGREGATE, InversionTarget, inversion_targets
from fedstack.outputs.server_view import ServerView

#: Targets attacked per view at most (each costs seconds of CPU).
DEFAULT_MAX_TARGETS = 5
#: How a match is decided, for audit.json and the report.
MATCH_RULE = (f"nearest training example of the target client by normalised correlation; a "
              f"match when it exceeds the {MATCH_QUANTILE:.0%} quantile of the nearest-neighbour "
              "correlation that held-out examples (central test split) reach with the same "
              "client's data")


@dataclass
class TruthData:
    """Every client's training inputs and labels, and held-out inputs (scoring only)."""

    train: dict[int, tuple[np.ndarray, np.ndarray]]
    held_out: np.ndarray
    held_out_labels: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    image: bool
    bounds: tuple[float, float] | None


def load_truth(cfg: Any, partitions: list[int]) -> TruthData:
    """The partitions' training data and the central test split, as the clients had them."""
    from fedstack.task.client_data import load_client_data
    from fedstack.task.datasets import load_task_data

    data = load_task_data(cfg.task, cfg.seed)
    train = {}
    for p in sorted(set(partitions)):
        x, y = load_client_data(cfg, p, int(cfg.num_clients)).train.tensors
        train[p] = (x.numpy(), y.numpy())
    image = len(data.input_shape) == 3
    held_out = np.asarray(data.x_test)
    bounds = (float(held_out.min()), float(held_out.max())) if image else None
    return TruthData(train, held_out, np.asarray(data.y_test), tuple(data.input_shape),
                     int(data.num_classes), image, bounds)


def _model(cfg: Any, global_arrays: dict[str, np.ndarray]) -> torch.nn.Module:
    from fedstack.task.plugin import load_task, task_context

    model = load_task(cfg.task).build_model(task_context(cfg))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in global_arrays.items()})
    return model


def _label_agreement(inferred: np.ndarray, truth: np.ndarray) -> float:
    """Share of the batch whose label multiset the attacker got right."""
    common = Counter(inferred.tolist()) & Counter(truth.tolist())
    return sum(common.values()) / max(len(inferred), 1)


def attack_target(cfg: Any, target: InversionTarget, global_arrays: dict[str, np.ndarray],
                  truth: TruthData, settings: InversionSettings) -> dict[str, Any]:
    """Invert one target and score it against each client whose data it holds."""
    model = _model(cfg, global_arrays)
    grad = update_as_gradient(model, global_arrays, target.observed,
                              float(cfg.task.learning_rate))
    batch = max(1, min(target.batch, settings.max_batch))
    started = time.perf_counter()
    # The attacker's auxiliary data for label inference: the server's own test split.
    confusion = class_confusion(model, truth.held_out, truth.held_out_labels,
                                truth.num_classes)
    recon = invert(model, grad, batch=batch, input_shape=truth.input_shape,
                   num_classes=truth.num_classes, bounds=truth.bounds, confusion=confusion,
                   settings=settings)
    seconds = time.perf_counter() - started
    data_range = (truth.bounds[1] - truth.bounds[0]) if truth.bounds else 1.0
    per_client: dict[str, Any] = {}
    scores: list[Score] = []
    for p in target.partitions:
        x, _ = truth.train[p]
        s = score(recon.inputs, x, match_threshold(x, truth.held_out), image=truth.image,
                  data_range=data_range)
        scores.append(s)
        per_client[str(p)] = s.to_json()
    all_y = np.concatenate([truth.train[p][1] for p in target.partitions])
    out: dict[str, Any] = {
        "label": target.label, "kind": target.kind, "batch_observed": target.batch,
        "batch_reconstructed": batch, "loss": recon.loss, "seconds": round(seconds, 2),
        "labels_right": _label_agreement(recon.labels, all_y) if target.kind != KIND_AGGREGATE
        or len(all_y) == batch else None,
        "per_client": per_client,
    }
    if target.kind == KIND_AGGREGATE and len(target.partitions) > 1:
        x_all = np.concatenate([truth.train[p][0] for p in target.partitions])
        any_client = score(recon.inputs, x_all, match_threshold(x_all, truth.held_out),
                           image=truth.image, data_range=data_range)
        out["any_client"] = any_client.to_json()
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled share of matching reconstructions (per target client) and mean PSNR/SSIM,
    with 95% intervals. Reconstructions of one batch are not independent: the interval
    treats them as if they were, so it is optimistic for large batches."""
    matched = trials = 0
    psnrs: list[float] = []
    ssims: list[float] = []
    corrs: list[float] = []
    for r in results:
        for s in r["per_client"].values():
            matched += s["matched"]
            trials += s["reconstructions"]
            psnrs += s["psnr"] or []
            ssims += s["ssim"] or []
            corrs += s["correlations"]
    low, high = wilson_interval(matched, trials)
    out: dict[str, Any] = {"reconstructions": trials, "matched": matched,
                           "match_share": matched / trials if trials else None,
                           "match_share_ci95": [low, high]}
    for name, values in (("psnr", psnrs), ("ssim", ssims), ("correlation", corrs)):
        stats = mean_interval(values)
        out[f"{name}_mean"] = None if stats is None else stats[0]
        out[f"{name}_ci95"] = None if stats is None else [stats[1], stats[2]]
    return out


def audit_inversion(view: ServerView, cfg: Any, run_dir: Path, *,
                    settings: InversionSettings | None = None,
                    max_targets: int = DEFAULT_MAX_TARGETS) -> dict[str, Any]:
    """The inversion section of audit.json for one recorded view."""
    settings = settings or InversionSettings()
    from fedstack.audit.targets import he_decryption_check

    out: dict[str, Any] = {"round": view.round, "aggregation": view.aggregation,
                           "dp": view.dp, "settings": settings.to_json(),
                           "match_rule": MATCH_RULE}
    if view.aggregation == "he":
        out["he_decryption"] = he_decryption_check(view, run_dir, cfg)
    targets, why = inversion_targets(view)
    if not targets:
        out.update({"applicable": False, "reason": why})
        return out
    if str(cfg.task.name) not in ("digits", "breast_cancer", "synthetic_cifar", "hf"):
        out.update({"applicable": False,
                    "reason": f"task={cfg.task.name}: the audit cannot re-derive its clients' "
                              "data to score reconstructions (built-in tasks only)"})
        return out
    targets = targets[:max_targets]
    truth = load_truth(cfg, [p for t in targets for p in t.partitions])
    global_arrays = {k: v.numpy() for k, v in view.global_model().items()}
    results = [attack_target(cfg, t, global_arrays, truth, settings) for t in targets]
    out.update({"applicable": True, "reason": None, "targets": results,
                **summarise(results)})
    return out
