"""Models DP-SGD cannot clip are refused in every mode, before the first step, naming the layer.

Tied weights (one Parameter owned by two layers) make per-layer clipping under-count an
example's norm; BatchNorm mixes examples across the batch with or without affine weights;
running statistics leave the client without noise.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedstack.privacy import bookkeeping, model_check
from fedstack.privacy.bookkeeping import BookKeepingClipper
from fedstack.privacy.engine import LocalDP, check_dp_model
from fedstack.privacy.model_check import DPModelError, dp_problems, make_dp_compatible
from fedstack.privacy.settings import GRAD_SAMPLE_MODES, LocalDPSettings

N, BATCH, FEATURES = 64, 16, 6


class _Tied(nn.Module):
    """Two Linear layers (in a nested block) whose weight is one Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(FEATURES, FEATURES, bias=False), nn.Tanh())
        self.proj = nn.Linear(FEATURES, FEATURES, bias=False)
        self.proj.weight = self.block[0].weight
        self.head = nn.Linear(FEATURES, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.block(x))))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, FEATURES, generator=g) * 3,
                         torch.randint(0, 2, (N,), generator=g))


def _make_private(model: nn.Module, mode: str, *, allow_model_fix: bool = False):
    settings = LocalDPSettings(grad_sample_mode=mode, noise_multiplier=1.0,
                               target_epsilon=None, max_grad_norm=1.0)
    dp = LocalDP(settings, num_examples=N, batch_size=BATCH, local_epochs=1, planned_rounds=1,
                 generator=torch.Generator().manual_seed(1))
    return dp.make_private(model, lambda p: torch.optim.SGD(p, lr=0.1), _data(),
                           allow_model_fix=allow_model_fix)


def _bn_model(affine: bool, track: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8, affine=affine,
                                                                track_running_stats=track),
                         nn.Linear(8, 2))


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_tied_weights_refused_in_every_mode_naming_both_layers(mode: str) -> None:
    named = (r"layers 'block\.0' and 'proj' share one parameter "
             r"\('block\.0\.weight' = 'proj\.weight'\).*tied weights")
    with pytest.raises(DPModelError, match=named):
        check_dp_model(_Tied(), mode)
    # The client refuses too, before an optimizer exists, whether or not fixes are allowed.
    for allow in (False, True):
        with pytest.raises(DPModelError, match=r"'block\.0\.weight' = 'proj\.weight'"):
            _make_private(_Tied(), mode, allow_model_fix=allow)


def test_tied_weights_refused_by_the_bk_clipper_itself() -> None:
    with pytest.raises(bookkeeping.UnsupportedLayerError, match=r"'proj\.weight'"):
        BookKeepingClipper(_Tied(), 1.0)


def test_why_tied_weights_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the check bypassed, per-layer norms under-count some example's true norm, so the
    # clipped sum takes more than C from it; the run-time guard cannot see this (it checks
    # the clip arithmetic against the norms as computed), which is why the model is refused.
    monkeypatch.setattr(bookkeeping, "shared_parameters", lambda model: [])
    model = _Tied()
    x, y = _data().tensors
    x, y = x[:BATCH], y[:BATCH]
    clipper = BookKeepingClipper(model, 1e3)  # nothing clipped: norms are the raw ones
    with clipper.recording():
        out = model(x)
    bk_norms = clipper.clipped_backward(nn.functional.cross_entropy(out, y, reduction="none"))
    clipper.remove()
    true = []
    for i in range(BATCH):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                    list(model.parameters()))
        true.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    ratio = torch.stack(true) / bk_norms
    assert float(ratio.max()) > 1.01  # some example would be clipped to more than C


@pytest.mark.parametrize("affine,track", [(False, True), (False, False), (True, True),
                                          (True, False)])
@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_batchnorm_refused_with_or_without_affine(mode: str, affine: bool, track: bool) -> None:
    with pytest.raises(DPModelError, match=r"layer '1' \(BatchNorm1d\).*whole batch"):
        check_dp_model(_bn_model(affine, track), mode)
    with pytest.raises(DPModelError, match=r"layer '1' \(BatchNorm1d\)"):
        _make_private(_bn_model(affine, track), mode)


def test_bk_clipper_refuses_batchnorm_without_affine_weights() -> None:
    # No trainable parameter, so no "unsupported layer": it was refused nowhere before.
    with pytest.raises(bookkeeping.UnsupportedLayerError, match=r"layer '1' \(BatchNorm1d\)"):
        BookKeepingClipper(_bn_model(affine=False, track=False), 1.0)


def test_non_affine_batchnorm_is_fixed_to_groupnorm_when_fixes_are_allowed() -> None:
    fixed, changes = make_dp_compatible(_bn_model(affine=False, track=True))
    assert any("BatchNorm1d" in c for c in changes)
    assert isinstance(fixed[1], nn.GroupNorm) and not fixed[1].affine
    assert dp_problems(fixed) == []
    private = _make_private(_bn_model(affine=False, track=True), "bk", allow_model_fix=True)
    assert isinstance(private.model[1], nn.GroupNorm)


def test_sync_batchnorm_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.SyncBatchNorm(4, affine=False))
    with pytest.raises(DPModelError, match=r"layer '1' \(SyncBatchNorm\)"):
        check_dp_model(model, "hooks")


def test_instancenorm_refused_only_when_it_keeps_running_statistics() -> None:
    # InstanceNorm normalises each example by its own statistics: no mixing across the batch.
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2))
    assert dp_problems(plain) == []
    check_dp_model(plain, "hooks")
    stats = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(DPModelError, match=r"layer '1' \(InstanceNorm2d\).*track_running_stats"):
        check_dp_model(stats, "ew")
    fixed, _ = make_dp_compatible(stats)
    assert fixed[1].track_running_stats is False and dp_problems(fixed) == []


def test_not_refused_one_module_registered_twice_or_frozen_tied_weights() -> None:
    # One layer at two paths owns its parameters alone; frozen shared weights get no gradient.
    lin = nn.Linear(FEATURES, 2)
    aliased = nn.Module()
    aliased.a, aliased.b = lin, lin
    assert model_check.shared_parameters(aliased) == []
    frozen = _Tied()
    frozen.proj.weight.requires_grad_(False)
    assert dp_problems(frozen) == []


def test_module_called_twice_refused_by_bk_at_its_first_step() -> None:
    lin = nn.Linear(FEATURES, FEATURES)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(FEATURES, 2))
    private = _make_private(model, "bk")
    with pytest.raises(bookkeeping.UnsupportedLayerError, match="ran twice"):
        private.train_epoch()
    assert private.accountant.history == []  # no step was taken, none accounted


def test_bk_start_up_check_names_layers_without_a_formula() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(DPModelError, match=r"0 \(Embedding\).*grad_sample_mode=bk"):
        check_dp_model(model, "bk")
    check_dp_model(model, "functorch")  # Opacus's functorch mode has a formula for anything
