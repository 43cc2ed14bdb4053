"""PRG: known answer, determinism, key separation, uniformity."""

import os

import numpy as np
import pytest
from scipy.stats import chisquare

from fedstack.crypto import prg
from fedstack.crypto.prg import expand, expand_bytes


def test_aes_known_answer():
    # AES-256 of the all-zero block under the all-zero key (FIPS-197 style vector):
    # with a zero counter the first keystream block is exactly that.
    assert expand_bytes(bytes(32), 16, "aes").hex() == "dc95c078a2408989ad48a21492842087"


@pytest.mark.parametrize("alg", ["aes", "chacha20"])
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_deterministic_and_key_separated(alg, dtype):
    k1, k2 = os.urandom(32), os.urandom(32)
    a = expand(k1, 1000, dtype, alg)
    assert a.dtype == dtype and a.shape == (1000,)
    assert np.array_equal(a, expand(k1, 1000, dtype, alg))
    assert not np.array_equal(a, expand(k2, 1000, dtype, alg))
    # a prefix of a longer stream is the shorter stream
    assert np.array_equal(a[:10], expand(k1, 10, dtype, alg))


def test_algorithms_differ_and_bad_inputs_rejected():
    k = os.urandom(32)
    assert not np.array_equal(expand(k, 64, np.uint32, "aes"), expand(k, 64, np.uint32, "chacha20"))
    with pytest.raises(ValueError):
        expand(k, 4, np.int32)
    with pytest.raises(ValueError):
        expand(b"short", 4)
    with pytest.raises(ValueError):
        expand(k, 4, np.uint32, "rc4")


@pytest.mark.parametrize("alg", ["aes", "chacha20"])
def test_bytes_are_uniform(alg):
    data = np.frombuffer(expand_bytes(os.urandom(32), 1 << 18, alg), dtype=np.uint8)
    counts = np.bincount(data, minlength=256)
    assert chisquare(counts).pvalue > 1e-6
    # the test can fail: a biased stream (low nibble only) is caught
    assert chisquare(np.bincount(data & 0x0F, minlength=256)).pvalue < 1e-6


@pytest.mark.parametrize("alg", ["aes", "chacha20"])
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("size", [1, 63, 64, 65, 3 * 64 + 5])
def test_accumulate_equals_adding_each_expanded_stream(monkeypatch, alg, dtype, size):
    """Block by block (64-word blocks here, so streams continue across block boundaries and
    end in a partial block) gives exactly out + sum(sign * expand(key))."""
    monkeypatch.setattr(prg, "ACCUMULATE_BLOCK_BYTES", 64 * np.dtype(dtype).itemsize)
    rng = np.random.default_rng(size)
    out = rng.integers(0, np.iinfo(dtype).max, size=size, dtype=dtype)
    streams = [(os.urandom(32), sign) for sign in (1, -1, -1, 1, 1)]
    expected = out.copy()
    for key, sign in streams:
        if sign == 1:
            expected += expand(key, size, dtype, alg)
        else:
            expected -= expand(key, size, dtype, alg)
    assert prg.accumulate(out, streams, alg) is out
    assert np.array_equal(out, expected)
    # the test can fail: a sign flipped on one stream changes the result
    flipped = [(k, -s) if i == 1 else (k, s) for i, (k, s) in enumerate(streams)]
    assert not np.array_equal(prg.accumulate(expected.copy(), flipped, alg), out)


def test_accumulate_rejects_bad_arguments():
    k = os.urandom(32)
    with pytest.raises(ValueError, match="sign"):
        prg.accumulate(np.zeros(8, np.uint32), [(k, 2)])
    with pytest.raises(ValueError, match="uint32 or uint64"):
        prg.accumulate(np.zeros(8, np.int32), [(k, 1)])
    with pytest.raises(ValueError, match="contiguous"):
        prg.accumulate(np.zeros(16, np.uint32)[::2], [(k, 1)])
    with pytest.raises(ValueError, match="bytes"):
        prg.accumulate(np.zeros(8, np.uint32), [(b"short", 1)])
