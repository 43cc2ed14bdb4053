"""PRG: known answer, determinism, key separation, uniformity."""

import os

import numpy as np
import pytest
from scipy.stats import chisquare

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
