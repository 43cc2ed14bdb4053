"""Book-keeping per-sample clipping equals Opacus's clipped-and-summed gradients."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedstack.privacy import bookkeeping
from fedstack.privacy.bookkeeping import BookKeepingClipper, ClipBoundError, UnsupportedLayerError
from fedstack.task.models import build_model

_CE = nn.CrossEntropyLoss(reduction="none")


def _opacus_clipped_sum(model: nn.Module, x, y, clip: float):
    """Reference: Opacus per-sample gradients, Opacus's clip factor, summed."""
    gsm = GradSampleModule(model, loss_reduction="sum")
    nn.CrossEntropyLoss(reduction="sum")(gsm(x), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    samples = [p.grad_sample for p in params]
    norms = torch.stack([g.reshape(len(x), -1).norm(dim=1) for g in samples], 1).norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    sums = [torch.einsum("b,b...->...", factors, g) for g in samples]
    gsm._close()
    return norms, sums


def _bk_clipped_sum(model: nn.Module, x, y, clip: float):
    clipper = BookKeepingClipper(model, clip)
    with clipper.recording():
        out = model(x)
    norms = clipper.clipped_backward(nn.CrossEntropyLoss(reduction="none")(out, y))
    clipper.remove()
    return norms, [p.grad.clone() for p in model.parameters() if p.requires_grad]


class _Mixed(nn.Module):
    """Strided/dilated conv, GroupNorm and a Linear on a token dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2),
                              padding=(1, 0))
        self.norm = nn.GroupNorm(2, 8)
        self.tok = nn.Linear(6, 5)
        self.head = nn.Linear(8 * 5 * 5, 4, bias=False)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))  # (B, 8, 5, 6)
        h = torch.tanh(self.tok(h))  # Linear over the last dim: (B, 8, 5, 5)
        return self.head(h.flatten(1))


def _models():
    return {
        "digits_cnn": (lambda: build_model("digits_cnn", (1, 8, 8), 10, 3),
                       lambda g: torch.rand(24, 1, 8, 8, generator=g), 10),
        "tabular_mlp": (lambda: build_model("tabular_mlp", (30,), 2, 3),
                        lambda g: torch.randn(24, 30, generator=g), 2),
        "mixed": (_Mixed, lambda g: torch.randn(24, 3, 9, 8, generator=g), 4),
    }


@pytest.mark.parametrize("name", ["digits_cnn", "tabular_mlp", "mixed"])
@pytest.mark.parametrize("clip", [1e-3, 0.5, 1e3])
def test_clipped_sum_matches_opacus(name: str, clip: float) -> None:
    build, make_x, classes = _models()[name]
    g = torch.Generator().manual_seed(0)
    x, y = make_x(g), torch.randint(0, classes, (24,), generator=g)
    ours, ref = build(), build()
    ref.load_state_dict(ours.state_dict())
    norms, grads = _bk_clipped_sum(ours, x, y, clip)
    ref_norms, ref_grads = _opacus_clipped_sum(ref, x, y, clip)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["digits_cnn", "mixed"])
def test_reused_workspaces_stay_correct_across_batch_sizes(name: str) -> None:
    # Poisson batches change size every step; the clipper reuses its scratch buffers (and
    # the zero border of padded inputs) across steps. Every step must still match Opacus.
    build, make_x, classes = _models()[name]
    ours, ref = build(), build()
    ref.load_state_dict(ours.state_dict())
    clipper = BookKeepingClipper(ours, 0.5)
    g = torch.Generator().manual_seed(4)
    for batch in (24, 7, 40, 1, 24):
        x = make_x(g)[:1].repeat(batch, *([1] * (make_x(g).dim() - 1)))
        x = x + torch.randn(x.shape, generator=g)
        y = torch.randint(0, classes, (batch,), generator=g)
        for p in ours.parameters():
            p.grad = None
        with clipper.recording():
            out = ours(x)
        norms = clipper.clipped_backward(_CE(out, y), scale=0.25)
        ref_norms, ref_sums = _opacus_clipped_sum(ref, x, y, 0.5)
        for p in ref.parameters():
            p.grad = None
        torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
        for p, want in zip(ours.parameters(), ref_sums, strict=True):
            torch.testing.assert_close(p.grad, 0.25 * want, rtol=1e-4, atol=1e-6)


def test_ghost_norm_path_matches_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the Gram-matrix ("ghost") formula that large layers use.
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    a, b = build_model("digits_cnn", (1, 8, 8), 10, 5), build_model("digits_cnn", (1, 8, 8), 10, 5)
    norms_a, grads_a = _bk_clipped_sum(a, x, y, 0.3)
    monkeypatch.setattr(bookkeeping, "MAX_PER_SAMPLE_ELEMENTS", 0)
    norms_b, grads_b = _bk_clipped_sum(b, x, y, 0.3)
    torch.testing.assert_close(norms_a, norms_b, rtol=1e-4, atol=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_clipped_sum_bounded_per_example() -> None:
    # Each example contributes at most C: the clipped sum has norm <= B * C.
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(32, 1, 8, 8, generator=g) * 5, torch.randint(0, 10, (32,), generator=g)
    model = build_model("digits_cnn", (1, 8, 8), 10, 0)
    norms, grads = _bk_clipped_sum(model, x, y, 1e-3)
    total = torch.sqrt(sum(gr.pow(2).sum() for gr in grads))
    assert float(norms.min()) > 1e-3  # clipping was active for every example
    assert float(total) <= 32 * 1e-3 * (1 + 1e-5)


def test_frozen_parameters_get_no_gradient() -> None:
    model = build_model("tabular_mlp", (30,), 2, 0)
    model.net[0].weight.requires_grad_(False)
    x, y = torch.randn(8, 30), torch.randint(0, 2, (8,))
    _, grads = _bk_clipped_sum(model, x, y, 1.0)
    assert model.net[0].weight.grad is None
    assert model.net[0].bias.grad is not None and len(grads) == 5


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedLayerError, match=r"0 \(Embedding\)"):
        BookKeepingClipper(model, 1.0)


def test_inplace_activation_detected() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    clipper = BookKeepingClipper(model, 1.0)
    with clipper.recording():
        out = model(torch.randn(3, 4))
    with pytest.raises(UnsupportedLayerError, match="in place"):
        clipper.clipped_backward(_CE(out, torch.tensor([0, 1, 0])))


def test_layer_outside_recording_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    clipper = BookKeepingClipper(model, 1.0)
    out = model(torch.randn(3, 4))  # not recorded: its gradient would escape clipping
    with pytest.raises(RuntimeError, match="recording"):
        clipper.clipped_backward(_CE(out, torch.tensor([0, 1, 0])))


def test_remove_restores_plain_modules() -> None:
    # Recording wraps each layer's forward (no module hooks: they cost ~17 µs per layer per
    # step); remove() must leave the model exactly as it was, a custom forward included.
    model = build_model("tabular_mlp", (30,), 2, 0)
    def custom(x):  # an instance-level forward set by someone else
        return torch.zeros(x.shape[0], 32)

    model.net[2].forward = custom
    x = torch.randn(5, 30)
    before = model(x)
    clipper = BookKeepingClipper(model, 1.0)
    with clipper.recording():
        torch.testing.assert_close(model(x), before)
    assert "forward" in model.net[0].__dict__
    clipper.remove()
    assert "forward" not in model.net[0].__dict__ and "forward" not in model.net[4].__dict__
    assert model.net[2].__dict__["forward"] is custom
    torch.testing.assert_close(model(x), before)
    assert not model.net[0]._forward_hooks


def test_parameter_outside_the_formulas_is_named() -> None:
    # The per-layer formulas clip .weight and .bias; any other parameter would escape.
    model = nn.Sequential(nn.Linear(4, 2))
    model[0].register_parameter("gain", nn.Parameter(torch.ones(2)))
    with pytest.raises(UnsupportedLayerError, match=r"0 \(Linear with parameters gain\)"):
        BookKeepingClipper(model, 1.0)


def _broken_factors(kind: str):
    right = bookkeeping.clip_factors
    if kind == "unclipped":
        return lambda norms, clip, scale: torch.full_like(norms, scale)
    return lambda norms, clip, scale: -2 * right(norms, clip, scale)  # |c_i| twice too big


@pytest.mark.parametrize("kind", ["unclipped", "negative", "epsilon"])
def test_guard_stops_a_step_whose_clipping_is_broken(monkeypatch: pytest.MonkeyPatch,
                                                     kind: str) -> None:
    # Break the clip arithmetic three ways; the guard must refuse before any gradient is
    # written (p.grad stays None), and say so without data-dependent numbers.
    clip = 1e-3
    if kind == "epsilon":
        monkeypatch.setattr(bookkeeping, "CLIP_EPSILON", -clip / 2)  # factor C / (n - C/2)
    else:
        monkeypatch.setattr(bookkeeping, "clip_factors", _broken_factors(kind))
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(16, 1, 8, 8, generator=g) * 5, torch.randint(0, 10, (16,), generator=g)
    model = build_model("digits_cnn", (1, 8, 8), 10, 0)
    clipper = BookKeepingClipper(model, clip)
    with clipper.recording():
        out = model(x)
    with pytest.raises(ClipBoundError, match=r"dp\.max_grad_norm=0\.001") as info:
        clipper.clipped_backward(_CE(out, y), scale=0.5)
    assert all(p.grad is None for p in model.parameters())
    assert not any(ch.isdigit() for ch in str(info.value).replace("0.001", ""))


def test_guard_stops_non_finite_norms() -> None:
    # A diverged loss (here a NaN input) would put NaN into every parameter; it stops instead.
    model = build_model("tabular_mlp", (30,), 2, 0)
    x = torch.randn(8, 30)
    x[3, 0] = float("nan")
    clipper = BookKeepingClipper(model, 1.0)
    with clipper.recording():
        out = model(x)
    with pytest.raises(ClipBoundError, match="not finite"):
        clipper.clipped_backward(_CE(out, torch.zeros(8, dtype=torch.long)))
    assert all(p.grad is None for p in model.parameters())


def test_guard_passes_examples_clipped_exactly_to_the_bound() -> None:
    # Every example clipped (tiny C): each contributes C·n/(n + 1e-6), a hair under C.
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(32, 1, 8, 8, generator=g) * 5, torch.randint(0, 10, (32,), generator=g)
    norms, _ = _bk_clipped_sum(build_model("digits_cnn", (1, 8, 8), 10, 0), x, y, 1e-4)
    contributions = bookkeeping.clip_factors(norms, 1e-4, 1.0) * norms
    assert float(contributions.min()) > 1e-4 * (1 - 1e-5)
