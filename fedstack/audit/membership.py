"""Membership inference on a final model: a loss threshold and offline LiRA.

Why two attacks: the loss threshold (Yeom et al. 2018) is the classic baseline, but it
mostly finds examples that are easy for *any* model, so it looks good on average (AUC) and
poor where it matters, at low false-positive rates. LiRA (Carlini et al. 2022, "Membership
Inference Attacks From First Principles") calibrates per example: shadow models show how
confident a model is on *this* example when it never saw it, and a member stands out
against that. The offline variant trains every shadow without the target examples, so the
shadows are trained once, before (or without) knowing which targets to test, and the attack
is a one-sided test: "is the target model more confident on x than models that never saw
x?", P[Z ≥ φ(x)] with Z ~ N(μ_out(x), σ_out²), on the logit-scaled confidence
φ = log(p_y / (1 - p_y)), whose distribution over training randomness is close to Gaussian.

Reported per attack (Carlini et al.'s recommendation): AUC, and the TPR at 1% and 0.1% FPR,
with their uncertainty: a bootstrap interval for the AUC (members and non-members resampled
separately) and Clopper-Pearson intervals for the TPR at the threshold chosen on the
non-members, plus the sample sizes. A TPR at an FPR below 1/#non-members is not resolved by
the data (the threshold then admits no non-member at all); `resolved` says so.

Pure functions over (model, members, non-members, shadow trainer); nothing here imports
Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

#: FPRs at which the TPR is reported.
DEFAULT_FPRS: tuple[float, ...] = (0.01, 0.001)
#: Bootstrap resamples for the AUC interval.
DEFAULT_BOOTSTRAP = 1000
#: Two-sided confidence level of every interval.
CONFIDENCE = 0.95
#: Below this many shadows, one variance for all examples (Carlini et al. §VI-A: a
#: per-example variance from few OUT samples is too noisy).
PER_EXAMPLE_VARIANCE_MIN_SHADOWS = 64
#: Floor of the OUT standard deviation (confidences of an example identical in all shadows).
MIN_STD = 1e-3
#: Examples per forward pass when scoring.
SCORE_BATCH = 1024

#: Trains a fresh shadow model on (inputs, labels) with the given seed; returns it.
ShadowTrainer = Callable[[np.ndarray, np.ndarray, int], nn.Module]


@torch.no_grad()
def _logits(model: nn.Module, inputs: np.ndarray) -> torch.Tensor:
    model.eval()
    x = torch.as_tensor(np.asarray(inputs))
    return torch.cat([model(x[s:s + SCORE_BATCH]) for s in range(0, len(x), SCORE_BATCH)])


def example_losses(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each example under `model` (no reduction)."""
    logits = _logits(model, inputs)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return torch.nn.functional.cross_entropy(logits, y, reduction="none").double().numpy()


def logit_confidence(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """φ = log p_y - log(1 - p_y), computed from the logits without cancellation."""
    logits = _logits(model, inputs).double()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()


def loss_threshold_scores(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Membership scores of the loss-threshold attack: higher = more likely a member."""
    return -example_losses(model, inputs, labels)


def offline_lira_scores(target_confidence: np.ndarray, shadow_confidences: np.ndarray,
                        *, per_example_variance: bool | None = None,
                        recalibrate: bool = True) -> np.ndarray:
    """Offline LiRA scores from φ under the target and under OUT shadows (shadows × examples).

    Score = z = (φ_target - μ_out) / σ_out: large when the target is far more confident
    than models that never saw the example. The test's p-value P[Z ≥ φ_target] is a
    decreasing function of z, so z ranks exactly as -log p does, without p underflowing
    (p < 1e-308 when shadows are much more confident than the target, which then turned every
    score into a tie). `per_example_variance=None` chooses a per-example σ only with at
    least PER_EXAMPLE_VARIANCE_MIN_SHADOWS shadows.

    `recalibrate`: first map the shadows' scale onto the target's by the least-squares line
    φ_target ≈ a + b·μ_out over all targets (no membership labels used), then test against
    N(a + b·μ_out, (b·σ_out)²). Why: shadows trained centrally only approximate a federated
    (or DP) recipe; measured on a digits-CNN FedAvg run they were more confident on every
    example (mean φ 7.7 vs 5.8, b ≈ 0.64), and the plain test's ranking fell to chance
    (AUC 0.50) where the loss alone reached 0.56; recalibrated it was 0.56 again. With
    shadows that match (b ≈ 1, a ≈ 0) it changes little.
    """
    out = np.asarray(shadow_confidences, dtype=np.float64)
    target = np.asarray(target_confidence, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] != target.shape[0] or out.shape[0] < 2:
        raise ValueError(f"need >= 2 shadows x {target.shape[0]} examples, got {out.shape}")
    mean = out.mean(axis=0)
    if per_example_variance is None:
        per_example_variance = out.shape[0] >= PER_EXAMPLE_VARIANCE_MIN_SHADOWS
    std = out.std(axis=0, ddof=1) if per_example_variance else np.full_like(
        mean, np.sqrt(np.mean(out.var(axis=0, ddof=1))))
    if recalibrate and len(target) > 2 and np.ptp(mean) > 0:
        slope, intercept = np.polyfit(mean, target, 1)
        if slope > 0:
            mean, std = intercept + slope * mean, slope * std
    return (target - mean) / np.maximum(std, MIN_STD)


def train_shadows(trainer: ShadowTrainer, population_x: np.ndarray, population_y: np.ndarray,
                  num_shadows: int, subset_size: int, seed: int) -> list[nn.Module]:
    """`num_shadows` models, each on a seed-drawn subset of the population.

    The population must exclude every target (member and non-member): that is what makes
    the attack offline, and every shadow an OUT model for every target.
    """
    if num_shadows < 2:
        raise ValueError(f"offline LiRA needs >= 2 shadow models, got {num_shadows}")
    if not 0 < subset_size <= len(population_y):
        raise ValueError(f"shadow subset size {subset_size} not in 1..{len(population_y)}")
    rng = np.random.default_rng(seed)
    shadows = []
    for k in range(num_shadows):
        pick = rng.choice(len(population_y), size=subset_size, replace=False)
        shadows.append(trainer(population_x[pick], population_y[pick], seed * 1_000 + k))
    return shadows


@dataclass(frozen=True)
class TprAtFpr:
    """TPR at a target FPR, the threshold's actual FPR and Clopper-Pearson intervals."""

    target_fpr: float
    tpr: float
    tpr_interval: tuple[float, float]
    fpr: float
    fpr_interval: tuple[float, float]
    #: False: fewer than 1/target_fpr non-members, so the FPR is not resolved by the data.
    resolved: bool


@dataclass(frozen=True)
class MembershipResult:
    """One attack's numbers on one model, honest about the sample sizes."""

    attack: str
    auc: float
    auc_interval: tuple[float, float]
    tpr_at_fpr: tuple[TprAtFpr, ...]
    num_members: int
    num_non_members: int
    bootstrap: int
    confidence: float = CONFIDENCE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def roc_auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    """P[score(member) > score(non-member)] + ½ P[tie]: the Mann-Whitney AUC."""
    ranks = stats.rankdata(scores)
    members = np.asarray(is_member, dtype=bool)
    n1, n0 = int(members.sum()), int((~members).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError(f"need members and non-members, got {n1} and {n0}")
    return float((ranks[members].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE
                    ) -> tuple[float, float]:
    """Exact two-sided binomial interval for a proportion."""
    if trials == 0:
        return 0.0, 1.0
    tail = (1 - confidence) / 2
    low = 0.0 if successes == 0 else float(stats.beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(
        stats.beta.ppf(1 - tail, successes + 1, trials - successes))
    return low, high


def tpr_at_fpr(scores: np.ndarray, is_member: np.ndarray, target_fpr: float,
               confidence: float = CONFIDENCE) -> TprAtFpr:
    """TPR of the loosest threshold whose empirical FPR is ≤ target_fpr (score > threshold)."""
    members = np.asarray(is_member, dtype=bool)
    member_scores, non_scores = scores[members], np.sort(scores[~members])[::-1]
    allowed = int(np.floor(target_fpr * len(non_scores)))  # false positives allowed
    # Threshold = the (allowed+1)-th highest non-member score: at most `allowed` lie above.
    threshold = non_scores[allowed] if allowed < len(non_scores) else -np.inf
    false_pos = int((non_scores > threshold).sum())
    true_pos = int((member_scores > threshold).sum())
    return TprAtFpr(
        target_fpr=float(target_fpr),
        tpr=true_pos / len(member_scores),
        tpr_interval=clopper_pearson(true_pos, len(member_scores), confidence),
        fpr=false_pos / len(non_scores),
        fpr_interval=clopper_pearson(false_pos, len(non_scores), confidence),
        resolved=len(non_scores) * target_fpr >= 1,
    )


def evaluate_scores(attack: str, scores: Sequence[float] | np.ndarray,
                    is_member: Sequence[bool] | np.ndarray, *,
                    fprs: Sequence[float] = DEFAULT_FPRS, bootstrap: int = DEFAULT_BOOTSTRAP,
                    seed: int = 0, confidence: float = CONFIDENCE) -> MembershipResult:
    """AUC (with a stratified bootstrap interval) and TPR at each FPR of membership scores."""
    values = np.asarray(scores, dtype=np.float64)
    members = np.asarray(is_member, dtype=bool)
    if values.shape != members.shape or not np.all(np.isfinite(values)):
        raise ValueError("need one finite score per example")
    auc = roc_auc(values, members)
    rng = np.random.default_rng(seed)
    member_idx, non_idx = np.flatnonzero(members), np.flatnonzero(~members)
    label = np.r_[np.ones(len(member_idx), bool), np.zeros(len(non_idx), bool)]
    resampled = [
        roc_auc(values[np.r_[rng.choice(member_idx, len(member_idx)),
                             rng.choice(non_idx, len(non_idx))]], label)
        for _ in range(bootstrap)
    ]
    tail = (1 - confidence) / 2
    interval = ((float(np.quantile(resampled, tail)), float(np.quantile(resampled, 1 - tail)))
                if bootstrap else (float("nan"), float("nan")))
    return MembershipResult(
        attack=attack, auc=auc, auc_interval=interval,
        tpr_at_fpr=tuple(tpr_at_fpr(values, members, f, confidence) for f in fprs),
        num_members=len(member_idx), num_non_members=len(non_idx), bootstrap=int(bootstrap),
        confidence=confidence,
    )


def membership_audit(
    model: nn.Module,
    members: tuple[np.ndarray, np.ndarray],
    non_members: tuple[np.ndarray, np.ndarray],
    *,
    population: tuple[np.ndarray, np.ndarray] | None = None,
    shadow_trainer: ShadowTrainer | None = None,
    shadows: Sequence[nn.Module] | None = None,
    num_shadows: int = 16,
    shadow_subset_size: int | None = None,
    fprs: Sequence[float] = DEFAULT_FPRS,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, MembershipResult]:
    """Both attacks on `model`: `loss_threshold` always, `lira_offline` given shadows.

    `members` were in the model's training data, `non_members` were not (same
    distribution); `population` is further data disjoint from both, which the shadows are
    trained on (random subsets of `shadow_subset_size`, default half of it, as in
    Carlini et al.'s setup where each shadow sees half the data). Models already trained
    that way may be passed as `shadows` instead (offline shadows serve any target model
    whose targets they never saw, e.g. every stack of one benchmark).
    """
    x = np.concatenate([members[0], non_members[0]])
    y = np.concatenate([members[1], non_members[1]])
    is_member = np.r_[np.ones(len(members[1]), bool), np.zeros(len(non_members[1]), bool)]
    results = {"loss_threshold": evaluate_scores(
        "loss_threshold", loss_threshold_scores(model, x, y), is_member,
        fprs=fprs, bootstrap=bootstrap, seed=seed)}
    if shadows is None and shadow_trainer is not None:
        if population is None:
            raise ValueError("offline LiRA needs a population disjoint from the targets")
        size = shadow_subset_size or len(population[1]) // 2
        shadows = train_shadows(shadow_trainer, population[0], population[1], num_shadows,
                                size, seed)
    if shadows is not None:
        out = np.stack([logit_confidence(s, x, y) for s in shadows])
        scores = offline_lira_scores(logit_confidence(model, x, y), out)
        results["lira_offline"] = evaluate_scores(
            "lira_offline", scores, is_member, fprs=fprs, bootstrap=bootstrap, seed=seed)
    return results


def sgd_shadow_trainer(model_factory: Callable[[], nn.Module], *, epochs: int, batch_size: int,
                       learning_rate: float, momentum: float = 0.9) -> ShadowTrainer:
    """A ShadowTrainer with plain mini-batch SGD (the recipe should mimic the target's)."""

    def train(inputs: np.ndarray, labels: np.ndarray, seed: int) -> nn.Module:
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = model_factory()
        x = torch.as_tensor(np.asarray(inputs))
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch_size):
                idx = order[start:start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
        return model

    return train


# --------------------------------------------------------------------------- a run's audit
#: Membership targets per side (members, non-members) drawn from a run's data.
RUN_TARGETS = 250
#: Seconds a run's offline LiRA may spend training shadows: as many as fit (each one is a
#: centralised training of the task's model with the run's recipe: digits_linear ~0.2 s,
#: the 85k-parameter digits CNN ~10 s on one loaded core), between these bounds.
RUN_SHADOW_SECONDS = 120.0
RUN_MIN_SHADOWS, RUN_MAX_SHADOWS = 4, 64


@dataclass(frozen=True)
class RunExamples:
    """A run's examples as the server can rebuild them from the config (pure functions of
    it, as the start-up check does): what the clients trained on and what no one did."""

    train: tuple[np.ndarray, np.ndarray]
    #: The central test split and every client's validation split (never trained on).
    unseen: tuple[np.ndarray, np.ndarray]


def _arrays(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    from fedstack.privacy.poisson import as_tensor_dataset

    if len(dataset) == 0:
        return np.empty((0,), np.float32), np.empty((0,), np.int64)
    x, y = as_tensor_dataset(dataset).tensors[:2]
    return x.numpy(), y.numpy()


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    parts = [p for p in parts if len(p[1])]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def run_examples(cfg: Any) -> RunExamples:
    """Every client's training and validation split and the central test split."""
    from fedstack.task.plugin import load_task, task_context

    task = load_task(cfg.task)
    ctx = task_context(cfg)
    train, unseen = [], []
    for partition_id in range(int(cfg.num_clients)):
        part = task.load_partition(ctx, partition_id)
        train.append(_arrays(part.train))
        unseen.append(_arrays(part.val))
    test = task.load_test(ctx)
    if test is not None:
        unseen.append(_arrays(test))
    return RunExamples(train=_concat(train), unseen=_concat(unseen))


def run_model(cfg: Any) -> nn.Module:
    """A fresh model of the run's task (the run's seeded initial weights)."""
    from fedstack.task.plugin import load_task, task_context

    return load_task(cfg.task).build_model(task_context(cfg))


def load_weights(model: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    model.load_state_dict({name: torch.as_tensor(np.asarray(value))
                           for name, value in arrays.items()})
    model.eval()
    return model


def final_model(run_dir: Any, cfg: Any) -> tuple[nn.Module | None, str]:
    """(the run's last global model, "") or (None, why the server holds none in the clear)."""
    from pathlib import Path

    from fedstack.outputs.run_directory import latest_checkpoint, load_checkpoint

    latest = latest_checkpoint(Path(run_dir))
    if latest is None:
        return None, "the run left no checkpoint"
    record = load_checkpoint(latest[1])
    try:
        return load_weights(run_model(cfg), {k: record[k].numpy() for k in record}), ""
    except (RuntimeError, KeyError, ValueError) as exc:
        return None, (f"the checkpoint of round {latest[0]} is not the model in the clear "
                      f"(aggregation={cfg.aggregation.name}: {type(exc).__name__})")


def _run_noise_multiplier(run_dir: Any) -> float | None:
    """σ the clients used (median over the ledger's clients), for DP shadows."""
    import json
    from pathlib import Path

    path = Path(run_dir) / "privacy.json"
    if not path.is_file():
        return None
    clients = json.loads(path.read_text()).get("clients") or {}
    sigmas = [c["noise_multiplier"] for c in clients.values() if c.get("noise_multiplier")]
    return float(np.median(sigmas)) if sigmas else None


def clients_per_round(cfg: Any) -> int:
    """K: clients the strategy samples per round (fraction_train of num_clients, at least
    min_train_nodes, at most num_clients)."""
    n = int(cfg.num_clients)
    return max(1, min(n, max(int(cfg.min_train_nodes), round(float(cfg.fraction_train) * n))))


def run_shadow_trainer(cfg: Any, run_dir: Any = None) -> tuple[ShadowTrainer, str]:
    """Shadows trained like the run's model, centrally: the task's model, initial weights
    and optimizer, num_rounds × local_epochs epochs at batch K·B (K clients per round,
    batch B each).

    Why K·B: averaging K clients' steps on B examples each is, to first order, one step on
    K·B examples, and a FedAvg round over E local epochs takes E·n_k/B such steps, i.e. E
    epochs of the pooled data at batch K·B. Under dp=local the shadows run DP-SGD at the
    clients' clipping bound and σ·√K: each client's noise has std σC/B on its mean gradient,
    the average of K such has σC/(B√K), and central DP-SGD at batch K·B adds σ'C/(KB). An
    approximation (the OUT distribution need only be close); returns (trainer, recipe).
    """
    from fedstack.task.training import make_optimizer

    epochs = int(cfg.num_rounds) * int(cfg.task.local_epochs)
    per_round = clients_per_round(cfg)
    batch = int(cfg.task.batch_size) * per_round
    sigma = _run_noise_multiplier(run_dir) if str(cfg.dp.name) == "local" else None
    if sigma is not None:
        sigma *= float(np.sqrt(per_round))

    def train(inputs: np.ndarray, labels: np.ndarray, seed: int) -> nn.Module:
        model = run_model(cfg)
        data = torch.utils.data.TensorDataset(torch.as_tensor(np.asarray(inputs)),
                                              torch.as_tensor(np.asarray(labels)))
        if sigma is not None:
            _dp_train(model, data, cfg, sigma, batch, epochs, seed)
            return model
        optimizer = make_optimizer(model, cfg.task)
        generator = torch.Generator().manual_seed(seed)
        x, y = data.tensors
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch):
                idx = order[start:start + batch]
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
        return model

    how = (f"central DP-SGD, sigma={sigma:.3g}" if sigma is not None else "central SGD")
    return train, (f"{how}, {epochs} epochs, batch {batch} = {per_round} clients x "
                   f"{cfg.task.batch_size}, task optimizer")


def _dp_train(model: nn.Module, data: Any, cfg: Any, sigma: float, batch: int, epochs: int,
              seed: int) -> None:
    from dataclasses import fields, replace

    from fedstack.config import settings_of
    from fedstack.privacy.engine import LocalDP
    from fedstack.task.training import make_optimizer

    settings = settings_of(cfg.dp)
    changes = {"noise_multiplier": sigma, "target_epsilon": None, "max_epsilon": None,
               "delta": None}
    settings = replace(settings, **{k: v for k, v in changes.items()
                                    if k in {f.name for f in fields(settings)}})
    session = LocalDP(settings, num_examples=len(data), batch_size=batch,
                      local_epochs=epochs, planned_rounds=1,
                      generator=torch.Generator().manual_seed(seed))
    private = session.make_private(model, lambda _p: make_optimizer(model, cfg.task), data,
                                   allow_model_fix=False)
    try:
        for _ in range(epochs):
            private.train_epoch()
    finally:
        private.close()


def _budgeted_shadows(trainer: ShadowTrainer, population: tuple[np.ndarray, np.ndarray],
                      subset: int, seconds: float, seed: int) -> list[nn.Module]:
    """As many shadows as `seconds` allow (RUN_MIN_SHADOWS..RUN_MAX_SHADOWS), timed on the
    first two."""
    import time

    started = time.perf_counter()
    shadows = train_shadows(trainer, *population, RUN_MIN_SHADOWS // 2, subset, seed)
    each = (time.perf_counter() - started) / len(shadows)
    total = int(min(RUN_MAX_SHADOWS, max(RUN_MIN_SHADOWS, seconds // max(each, 1e-3))))
    return shadows + train_shadows(trainer, *population, total - len(shadows), subset,
                                   seed + 1)


def audit_membership(run_dir: Any, cfg: Any, *, num_targets: int = RUN_TARGETS,
                     num_shadows: int | None = None,
                     shadow_seconds: float = RUN_SHADOW_SECONDS,
                     seed: int = 0) -> dict[str, Any]:
    """`fedstack audit`'s membership section: both attacks on the run's final model.

    Members: `num_targets` examples drawn from the clients' training splits; non-members:
    as many from the central test split and the clients' validation splits; the shadows
    train on the remaining examples (never on a target): `num_shadows` of them, or (None)
    as many as `shadow_seconds` allow.
    """
    model, why = final_model(run_dir, cfg)
    if model is None:
        return {"applicable": False, "reason": why}
    examples = run_examples(cfg)
    (tx, ty), (ux, uy) = examples.train, examples.unseen
    n = min(num_targets, len(ty), len(uy) // 2)
    rng = np.random.default_rng(seed)
    members, non_members = rng.permutation(len(ty)), rng.permutation(len(uy))
    pop_x = np.concatenate([tx[members[n:]], ux[non_members[n:]]])
    pop_y = np.concatenate([ty[members[n:]], uy[non_members[n:]]])
    trainer, recipe = run_shadow_trainer(cfg, run_dir)
    subset = min(len(ty), (2 * len(pop_y)) // 3)
    shadows = (train_shadows(trainer, pop_x, pop_y, num_shadows, subset, seed)
               if num_shadows is not None
               else _budgeted_shadows(trainer, (pop_x, pop_y), subset, shadow_seconds, seed))
    num_shadows = len(shadows)
    results = membership_audit(
        model, (tx[members[:n]], ty[members[:n]]), (ux[non_members[:n]], uy[non_members[:n]]),
        shadows=shadows, seed=seed)
    lines = [f"- {n} members (clients' training data) vs {n} non-members (test and "
             f"validation splits); {num_shadows} offline shadows ({recipe}) on {subset} "
             "examples each, never a target"]
    unresolved = f", FPR not resolved by {n} non-members"
    for r in results.values():
        tprs = "; ".join(
            f"TPR at {t.target_fpr:.1%} FPR {t.tpr:.3f} (95% CI {t.tpr_interval[0]:.3f}-"
            f"{t.tpr_interval[1]:.3f}{'' if t.resolved else unresolved})"
            for t in r.tpr_at_fpr)
        lines.append(f"- {r.attack}: AUC {r.auc:.3f} (95% CI {r.auc_interval[0]:.3f}-"
                     f"{r.auc_interval[1]:.3f}); {tprs}")
    return {"applicable": True, "num_members": n, "num_non_members": n,
            "num_shadows": num_shadows, "shadow_recipe": recipe, "shadow_subset_size": subset,
            "attacks": {k: r.to_json() for k, r in results.items()},
            "summary_lines": lines}
