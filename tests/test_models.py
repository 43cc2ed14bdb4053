"""The built-in models: registry consistency, and the DP model (`digits_linear`) trains."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedstack.privacy.engine import LocalDP
from fedstack.privacy.model_check import dp_problems
from fedstack.privacy.settings import LocalDPSettings
from fedstack.task.datasets import load_digits_task
from fedstack.task.model_names import MODEL_NAMES
from fedstack.task.models import MODEL_BUILDERS, build_model


def _digits() -> tuple[TensorDataset, torch.Tensor, torch.Tensor]:
    data = load_digits_task(0.2, 0)
    train = TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))
    return train, torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_registry_matches_torch_free_names() -> None:
    assert set(MODEL_BUILDERS) == set(MODEL_NAMES)
    for name in MODEL_NAMES:
        shape = (30,) if name == "tabular_mlp" else (1, 8, 8)
        model = build_model(name, shape, 10, 0)
        assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_digits_linear_builds_deterministically_and_is_dp_compatible() -> None:
    a, b = build_model("digits_linear", (1, 8, 8), 10, 3), build_model("digits_linear",
                                                                        (1, 8, 8), 10, 3)
    assert sum(p.numel() for p in a.parameters()) == 64 * 10 + 10
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert dp_problems(a) == []
    trainable = {type(m) for m in a.modules() if any(True for _ in m.parameters(recurse=False))}
    assert trainable == {nn.Linear}


def test_digits_linear_trains_without_dp() -> None:
    train, x_test, y_test = _digits()
    model = build_model("digits_linear", (1, 8, 8), 10, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = train.tensors
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), 64):
            idx = perm[start:start + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    assert _accuracy(model, x_test, y_test) > 0.9


def test_digits_linear_trains_with_dp_sgd() -> None:
    # The book-keeping clipper (the default mode) supports it, and DP-SGD learns.
    train, x_test, y_test = _digits()
    model = build_model("digits_linear", (1, 8, 8), 10, 0)
    before = _accuracy(model, x_test, y_test)
    settings = LocalDPSettings(noise_multiplier=1.0, target_epsilon=None)
    dp = LocalDP(settings, num_examples=len(train), batch_size=64, local_epochs=3,
                 planned_rounds=1, generator=torch.Generator().manual_seed(0))
    private = dp.make_private(model, lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9), train)
    try:
        for _ in range(3):
            private.train_epoch()
    finally:
        private.close()
    after = _accuracy(model, x_test, y_test)
    assert after > 0.8 and after > before + 0.5
