"""A task's own per-example loss under DP-SGD: clipped per example in every mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedstack.privacy.engine import LocalDP
from fedstack.privacy.settings import LocalDPSettings
from fedstack.task.models import build_model

CLIP = 1e-3
LR = 1.0


def huge_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A per-example loss whose gradients dwarf the clip bound (unclipped: a huge step)."""
    return 1e4 * nn.functional.cross_entropy(outputs, targets, reduction="none")


@pytest.mark.parametrize("mode", ["bk", "hooks", "ghost"])
def test_custom_loss_is_clipped_per_example(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 30, generator=gen)
    y = torch.randint(0, 2, (64,), generator=gen)
    model = build_model("tabular_mlp", (30,), 2, 0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    settings = LocalDPSettings(noise_multiplier=0.0, target_epsilon=None, max_grad_norm=CLIP,
                               grad_sample_mode=mode)
    dp = LocalDP(settings, num_examples=64, batch_size=16, local_epochs=1, planned_rounds=1,
                 generator=torch.Generator().manual_seed(1))
    calls = {"n": 0}

    def counted(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return huge_loss(outputs, targets)

    private = dp.make_private(model, lambda p: torch.optim.SGD(p, lr=LR),
                              TensorDataset(x, y), allow_model_fix=False,
                              per_example_loss=counted)
    try:
        private.train_epoch()
    finally:
        private.close()
    after = torch.cat([p.detach().flatten() for p in private.model.parameters()])
    steps = private.steps_taken
    assert calls["n"] >= 1
    # Each step moves the model by at most lr * (sum of clipped grads) / expected batch;
    # with Poisson batches up to ~3x the expected size, far below the unclipped ~1e4 scale.
    assert float((after - before).norm()) <= steps * LR * CLIP * 4
    assert float((after - before).norm()) > 0
