"""Fixed-point codec: error bound, clipping, no-wrap guarantee and its check."""

import numpy as np
import pytest

from fedstack.crypto.quantise import FixedPointCodec, QuantisationError, auto_scale, ring_dtype


@pytest.mark.parametrize("bits", [24, 32, 48, 64])
def test_weighted_mean_within_bound(bits):
    clip, k, w_max = 2.0, 20, 500
    codec = FixedPointCodec(bits, clip, auto_scale(bits, clip, k, w_max), k, w_max)
    rng = np.random.default_rng(bits)
    xs = rng.normal(scale=1.5, size=(k, 300))
    ws = rng.integers(0, w_max + 1, size=k)
    ws[0] = w_max
    total = np.zeros(301, dtype=codec.dtype)
    for x, w in zip(xs, ws, strict=True):
        total += codec.encode(x, int(w))
    mean = codec.decode_mean(total)
    ref = (ws[:, None] * np.clip(xs, -clip, clip)).sum(0) / ws.sum()
    assert np.abs(mean - ref).max() <= codec.error_bound + 1e-12
    assert codec.decode(total)[1] == ws.sum()


def test_worst_case_sum_does_not_wrap_and_auto_scale_is_maximal():
    bits, clip, k, w_max = 32, 4.0, 50, 1000
    scale = auto_scale(bits, clip, k, w_max)
    codec = FixedPointCodec(bits, clip, scale, k, w_max)
    for sign in (1.0, -1.0):
        total = np.zeros(4, dtype=codec.dtype)
        for _ in range(k):
            total += codec.encode(np.full(3, sign * 100.0), w_max)  # clipped to +-clip
        weighted, weight = codec.decode(total)
        assert weight == k * w_max
        assert np.allclose(weighted, sign * clip * k * w_max)
    with pytest.raises(QuantisationError, match="can wrap"):
        FixedPointCodec(bits, clip, 2 * scale, k, w_max)


def test_contract_violations_rejected():
    codec = FixedPointCodec(32, 1.0, 1024.0, 10, 100)
    with pytest.raises(QuantisationError):
        codec.encode(np.array([np.nan]), 1)
    with pytest.raises(QuantisationError):
        codec.encode(np.zeros(2), 101)
    with pytest.raises(QuantisationError):
        FixedPointCodec(16, 1.0, 1.0, 1000, 1000)
    with pytest.raises(QuantisationError):
        ring_dtype(65)
    with pytest.raises(QuantisationError):
        codec.decode_mean(np.zeros(3, np.uint32))


def test_negative_values_use_twos_complement():
    codec = FixedPointCodec(20, 1.0, 64.0, 4, 4)
    words = codec.encode(np.array([-0.5, 0.5]), 2)
    assert words.dtype == np.uint32 and (words < 2**20).all()
    assert words[0] == 2**20 - 64 and words[1] == 64 and words[2] == 2
    weighted, weight = codec.decode(words)
    assert weighted.tolist() == [-1.0, 1.0] and weight == 2
