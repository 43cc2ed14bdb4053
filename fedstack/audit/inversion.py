"""Update inversion: reconstruct a client's training examples from what the server holds.

The attack is Geiping et al. 2020, "Inverting Gradients -- How easy is it to break privacy in
federated learning?": dummy inputs are optimised with Adam (signed gradients, step decay at
3/8, 5/8, 7/8 of the iterations) so that the gradient they produce at the global model points
the same way as the observed one (loss 1 - cosine similarity over all parameters jointly),
plus a total-variation prior for images and a box constraint to the data's range. Labels are
inferred from the last layer's bias gradient (exact for one example: the only negative entry,
Zhao et al. 2020 "iDLG"; for a batch, counts estimated from its magnitude) or given.

An update is not a gradient, but for a client that takes one full-batch step of SGD from
the global model θ it is one: Δ = θ_k - θ = -lr · ∇L(θ; batch), so -Δ is the gradient up to a
positive factor, which the cosine loss ignores. That is the attacker's best case, and the
audit's benchmark uses it; more local steps, secure aggregation's sums and DP noise make the
observed vector less of a gradient of the client's own batch, and the measurements show how
much that helps.

Success is decided against the truth, not by eye: each reconstruction's nearest neighbour in
the target client's training data (normalised correlation over all features), counted as a
match when the correlation exceeds a threshold calibrated on examples the client never had:
the 99th percentile of the nearest-neighbour correlation that held-out real examples (the
central test split) reach with the same client's data. So a reconstruction that merely looks
like a typical example of its class matches with probability <= 1%; one that matches is
closer to a specific training example than 99% of other real examples are. PSNR and SSIM
(images only) are reported against that nearest neighbour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

#: Quantile of held-out examples' nearest-neighbour correlation used as the match threshold.
MATCH_QUANTILE = 0.99
#: SSIM constants (Wang et al. 2004) for data in [0, 1], and its Gaussian window.
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_WINDOW, SSIM_SIGMA = 7, 1.5
#: PSNR reported for (near-)exact copies.
PSNR_CAP_DB = 100.0
#: Fractions of the iterations after which the step size drops 10x (Geiping et al.).
LR_MILESTONES = (3 / 8, 5 / 8, 7 / 8)


@dataclass(frozen=True)
class InversionSettings:
    """Attack budget and priors. Defaults: a few seconds of CPU per target on 8x8 digits."""

    iterations: int = 300
    learning_rate: float = 0.1
    #: Weight of the total-variation prior (images only; ignored for flat inputs).
    tv_weight: float = 1e-3
    #: Independent restarts; the one with the lowest loss is kept.
    restarts: int = 2
    #: Largest batch the attacker tries to reconstruct at once (bounds CPU and memory).
    max_batch: int = 32
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reconstruction:
    """What the attack produced: inputs, the labels it used, and its final loss."""

    inputs: np.ndarray  # (B, *input_shape)
    labels: np.ndarray  # (B,)
    loss: float


def update_as_gradient(model: nn.Module, global_arrays: Mapping[str, np.ndarray],
                       new_arrays: Mapping[str, np.ndarray],
                       learning_rate: float = 1.0) -> list[torch.Tensor]:
    """The observed 'gradient' -(θ_new - θ) / lr, per parameter of `model` (in its order).

    The cosine loss ignores the scale, but label inference reads magnitudes; the server
    knows the clients' learning rate from the run config it sent them.
    """
    out = []
    for name, _ in model.named_parameters():
        if name not in global_arrays or name not in new_arrays:
            raise KeyError(f"parameter {name!r} is missing from the recorded arrays")
        delta = np.asarray(new_arrays[name], dtype=np.float64) - np.asarray(
            global_arrays[name], dtype=np.float64)
        out.append(torch.from_numpy(-delta / learning_rate).to(torch.float32))
    return out


def _last_bias_index(model: nn.Module, num_classes: int) -> int:
    params = [p for _, p in model.named_parameters()]
    for index in range(len(params) - 1, -1, -1):
        if params[index].dim() == 1 and params[index].numel() == num_classes:
            return index
    raise ValueError("the model has no output bias of size num_classes to infer labels from")


def infer_labels(bias_grad: torch.Tensor, batch: int,
                 confusion: np.ndarray | None = None) -> torch.Tensor:
    """Labels of a batch from the output bias's gradient of the mean cross-entropy.

    g_c = mean_i (p_ic - 1[y_i = c]): each example of class c pulls entry c down by
    (1 - p_ic)/B. One example: the most negative entry (exact, iDLG). A batch: with
    `confusion` (M[k, c] = the model's mean probability of class c on examples of class k,
    estimated on auxiliary data such as the server's test split), g = (Mᵀ - I) n / B is
    solved for the counts n with sum n = B (least squares), which holds for a trained,
    confident model too; without it, predictions are assumed near uniform (an untrained
    model): n_c ≈ B (1/C - g_c). Every class with a negative entry gets at least one
    example (g_c < 0 needs n_c > 0); the rest are filled or trimmed to B by the largest
    remainders.
    """
    g = bias_grad.detach().double()
    classes = g.numel()
    if batch == 1:
        return torch.argmin(g).reshape(1)
    if confusion is not None:
        system = np.vstack([(np.asarray(confusion, np.float64).T - np.eye(classes)) / batch,
                            np.ones((1, classes))])
        target = np.concatenate([g.numpy(), [float(batch)]])
        solution = np.linalg.lstsq(system, target, rcond=None)[0]
        est = torch.clamp(torch.from_numpy(solution), min=0.0)
    else:
        est = torch.clamp(batch * (1.0 / classes - g), min=0.0)
    counts = torch.floor(est).long()
    negative = g < 0
    counts[negative & (counts == 0)] = 1
    while int(counts.sum()) > batch:
        # Trim the most over-counted class, keeping a class seen at least once where possible.
        spare = counts.double() - est - (counts <= 1).double() * batch
        counts[int(torch.argmax(torch.where(counts > 0, spare, -math.inf)))] -= 1
    while int(counts.sum()) < batch:
        counts[int(torch.argmax(est - counts.double()))] += 1
    return torch.repeat_interleave(torch.arange(classes), counts)


def class_confusion(model: nn.Module, inputs: np.ndarray, labels: np.ndarray,
                    num_classes: int) -> np.ndarray:
    """M[k, c]: mean softmax probability of class c on `inputs` of class k (a class without
    examples gets a uniform row). The attacker's auxiliary data: the server's test split."""
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.as_tensor(np.asarray(inputs))), dim=1).double().numpy()
    out = np.full((num_classes, num_classes), 1.0 / num_classes)
    for k in range(num_classes):
        rows = probs[np.asarray(labels) == k]
        if len(rows):
            out[k] = rows.mean(axis=0)
    return out


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (images of shape (B, C, H, W))."""
    if x.dim() < 4:
        return x.new_zeros(())
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def _cosine_loss(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
    g_norm = sum(g.pow(2).sum() for g in grads)
    t_norm = sum(t.pow(2).sum() for t in target)
    return 1.0 - dot / (torch.sqrt(g_norm) * torch.sqrt(t_norm) + 1e-12)  # type: ignore[operator]


def invert(model: nn.Module, target_grad: Sequence[torch.Tensor], *, batch: int,
           input_shape: tuple[int, ...], num_classes: int,
           bounds: tuple[float, float] | None, labels: torch.Tensor | None = None,
           confusion: np.ndarray | None = None,
           settings: InversionSettings = InversionSettings()) -> Reconstruction:
    """Reconstruct `batch` inputs whose mean cross-entropy gradient at `model` aligns with
    `target_grad` (Geiping et al. 2020). `bounds`: the data's value range, or None."""
    threads = torch.get_num_threads()
    # Thousands of tiny double-backward passes: synchronising intra-op threads costs more
    # than they save (several times slower on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        return _invert(model, target_grad, batch=batch, input_shape=input_shape,
                       num_classes=num_classes, bounds=bounds, labels=labels,
                       confusion=confusion, settings=settings)
    finally:
        torch.set_num_threads(threads)


def _invert(model: nn.Module, target_grad: Sequence[torch.Tensor], *, batch: int,
            input_shape: tuple[int, ...], num_classes: int,
            bounds: tuple[float, float] | None, labels: torch.Tensor | None,
            confusion: np.ndarray | None, settings: InversionSettings) -> Reconstruction:
    model.eval()
    params = [p for _, p in model.named_parameters()]
    target = [t.detach().to(p.dtype) for t, p in zip(target_grad, params, strict=True)]
    if labels is None:
        labels = infer_labels(target[_last_bias_index(model, num_classes)], batch, confusion)
    labels = labels.long()
    criterion = nn.CrossEntropyLoss()
    image = len(input_shape) == 3
    milestones = [int(settings.iterations * f) for f in LR_MILESTONES]
    best: Reconstruction | None = None
    gen = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.restarts):
        if bounds is not None:
            low, high = bounds
            init = low + (high - low) * torch.rand((batch, *input_shape), generator=gen)
        else:
            init = torch.randn((batch, *input_shape), generator=gen)
        x = init.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=settings.learning_rate)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        loss_value = math.inf
        for _ in range(settings.iterations):
            optimizer.zero_grad()
            grads = torch.autograd.grad(criterion(model(x), labels), params, create_graph=True)
            loss = _cosine_loss(grads, target)
            if image and settings.tv_weight > 0:
                loss = loss + settings.tv_weight * total_variation(x)
            (x_grad,) = torch.autograd.grad(loss, [x])
            x.grad = x_grad.sign()
            optimizer.step()
            schedule.step()
            if bounds is not None:
                with torch.no_grad():
                    x.clamp_(*bounds)
            loss_value = float(loss.detach())
        if best is None or loss_value < best.loss:
            best = Reconstruction(x.detach().numpy().copy(), labels.numpy().copy(), loss_value)
    assert best is not None
    return best


# --------------------------------------------------------------------------- scoring


def _flat_standardised(x: np.ndarray) -> np.ndarray:
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norm > 0, norm, 1.0)


def correlation_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every example of `a` with every example of `b` (flattened)."""
    return _flat_standardised(a) @ _flat_standardised(b).T


def match_threshold(truth: np.ndarray, held_out: np.ndarray,
                    quantile: float = MATCH_QUANTILE) -> float:
    """The `quantile` of held-out examples' nearest-neighbour correlation with `truth`."""
    best = correlation_matrix(held_out, truth).max(axis=1)
    return float(np.quantile(best, quantile))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, capped at PSNR_CAP_DB (an exact copy would be inf,
    which no mean survives)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    if mse == 0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(data_range ** 2 / mse))


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-(ax ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g)
    return w / w.sum()


def _filter(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """`img` (H, W) convolved with `window` (reflect padding: output has the input's size)."""
    pad = window.shape[0] // 2
    padded = np.pad(img, pad, mode="reflect")
    h, w = img.shape
    out = np.zeros_like(img, dtype=np.float64)
    for i in range(window.shape[0]):
        for j in range(window.shape[1]):
            out += window[i, j] * padded[i:i + h, j:j + w]
    return out


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004) of two images (C, H, W) or (H, W), averaged over
    channels: Gaussian window 7x7, σ = 1.5, reflect padding (8x8 digits keep every pixel)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 2:
        a, b = a[None], b[None]
    window = _gaussian_window(min(SSIM_WINDOW, 2 * (min(a.shape[1:]) // 2) - 1), SSIM_SIGMA)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    values = []
    for x, y in zip(a, b, strict=True):
        mx, my = _filter(x, window), _filter(y, window)
        sxx = _filter(x * x, window) - mx * mx
        syy = _filter(y * y, window) - my * my
        sxy = _filter(x * y, window) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
        values.append(float(s.mean()))
    return float(np.mean(values))


@dataclass
class Score:
    """How well a batch of reconstructions recovers a client's training examples."""

    reconstructions: int
    matched: int
    threshold: float
    correlations: list[float]
    psnr: list[float] | None
    ssim: list[float] | None
    #: Distinct training examples some reconstruction matched.
    examples_recovered: int
    client_examples: int

    @property
    def match_share(self) -> float:
        return self.matched / self.reconstructions if self.reconstructions else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["match_share"] = self.match_share
        return out


def score(recon: np.ndarray, truth: np.ndarray, threshold: float, *,
          image: bool, data_range: float = 1.0) -> Score:
    """Nearest-neighbour matches of `recon` in `truth` (the target client's training data)."""
    corr = correlation_matrix(recon, truth)
    nearest = corr.argmax(axis=1)
    best = corr[np.arange(len(recon)), nearest]
    matched = best >= threshold
    psnrs = ssims = None
    if image:
        psnrs = [psnr(recon[i], truth[j], data_range) for i, j in enumerate(nearest)]
        ssims = [ssim(recon[i], truth[j], data_range) for i, j in enumerate(nearest)]
    return Score(
        reconstructions=len(recon), matched=int(matched.sum()), threshold=threshold,
        correlations=[float(c) for c in best], psnr=psnrs, ssim=ssims,
        examples_recovered=len(set(nearest[matched].tolist())), client_examples=len(truth))
