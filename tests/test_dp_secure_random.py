"""dp.secure_rng: DP noise and Poisson sampling from AES-256-CTR."""

from __future__ import annotations

import pytest
import torch
from Crypto.Cipher import AES
from scipy import stats
from torch.utils.data import TensorDataset

from fedstack.config import ConfigError
from fedstack.privacy.engine import LocalDP
from fedstack.privacy.poisson import PoissonBatches
from fedstack.privacy.secure_random import AesCtrRandom, TorchRandom
from fedstack.privacy.settings import LocalDPSettings
from fedstack.task.models import build_model

KEY = bytes(range(32))


def test_keystream_is_aes256_ctr_of_the_full_key() -> None:
    # Reference: PyCryptodome's AES-256 in CTR mode, 128-bit counter from zero.
    want = AES.new(KEY, AES.MODE_CTR, nonce=b"", initial_value=0).encrypt(bytes(8 * 10))
    got = AesCtrRandom(KEY).words(10).numpy().tobytes()
    assert got == want
    other = bytearray(KEY)
    other[-1] ^= 1  # the last key byte matters: the whole 256-bit key is used
    assert AesCtrRandom(bytes(other)).words(10).numpy().tobytes() != want


def test_draws_continue_the_stream_and_fresh_keys_differ() -> None:
    one = AesCtrRandom(KEY)
    parts = torch.cat([one.words(3), one.words(5)])
    assert torch.equal(parts, AesCtrRandom(KEY).words(8))
    assert not torch.equal(AesCtrRandom().words(8), AesCtrRandom().words(8))
    with pytest.raises(ValueError, match="32-byte key"):
        AesCtrRandom(bytes(16))


def test_uniform_is_uniform_on_unit_interval() -> None:
    u = AesCtrRandom(KEY).uniform((400, 500))
    assert u.shape == (400, 500) and u.dtype == torch.float64
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("count", [1, 7, 200_001])
def test_normal_is_gaussian_with_the_requested_std(count: int) -> None:
    out = torch.full((count,), float("nan"))
    AesCtrRandom(KEY).normal_(out, 2.5)
    assert torch.isfinite(out).all()
    if count > 1000:
        assert abs(float(out.std()) / 2.5 - 1) < 0.01
        assert abs(float(out.mean())) < 0.02
        assert stats.kstest(out.numpy() / 2.5, "norm").pvalue > 1e-3


def test_secure_rng_drives_noise_and_sampling_of_a_round() -> None:
    n, batch, sigma, clip = 96, 16, 2.0, 1e-6
    data = TensorDataset(torch.rand(n, 1, 8, 8) * 4, torch.randint(0, 10, (n,)))
    settings = LocalDPSettings(noise_multiplier=sigma, target_epsilon=None,
                               max_grad_norm=clip, secure_rng=True)
    dp = LocalDP(settings, num_examples=n, batch_size=batch, local_epochs=1, planned_rounds=1)
    assert isinstance(dp.random, AesCtrRandom)
    model = build_model("digits_cnn", (1, 8, 8), 10, 1)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    private = dp.make_private(model, lambda p: torch.optim.SGD(p, lr=1.0), data)
    assert private.batches.random is dp.random and private.random is dp.random
    xb, yb = next(iter(private.batches))
    private._step(xb, yb)
    delta = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    # With C tiny the step is pure noise: std = lr * sigma * C / expected batch size.
    assert abs(float(delta.std()) / (sigma * clip / private.expected_batch_size) - 1) < 0.02
    # An explicit generator (reproducible tests) still wins over the setting.
    seeded = LocalDP(settings, num_examples=n, batch_size=batch, local_epochs=1,
                     planned_rounds=1, generator=torch.Generator().manual_seed(0))
    assert isinstance(seeded.random, TorchRandom)


def test_poisson_sampling_rate_with_secure_source() -> None:
    data = TensorDataset(torch.arange(200.0)[:, None], torch.zeros(200, dtype=torch.long))
    sizes = [len(b[1]) for b in PoissonBatches(data, 0.1, 300, AesCtrRandom(KEY))]
    assert len(sizes) == 300 and abs(sum(sizes) / 300 - 20) < 1.0


def test_secure_rng_needs_bk_mode() -> None:
    settings = LocalDPSettings(grad_sample_mode="hooks", secure_rng=True)
    with pytest.raises(ConfigError, match="secure_rng"):
        settings.validate(None)
