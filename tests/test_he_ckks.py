"""CKKS averaging primitives: correctness, precision bounds, capacity, validation of replies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedstack.strategies.he.ckks import (
    CiphertextError,
    EncryptedSum,
    EncryptedVector,
    aggregate,
    decrypt_mean,
    encrypt_update,
    num_ciphertexts,
)
from fedstack.strategies.he.keys import generate_keys
from fedstack.strategies.he.presets import DEFAULT_PRESET, PRESETS, noise_bound
from fedstack.strategies.he.seal_io import pack_uint, unpack_uint
from fedstack.strategies.he.settings import HESettings

MAX_ABS = 16.0
MAX_WEIGHT = 10_000


@pytest.fixture(scope="module")
def keys():
    return {name: generate_keys(p) for name, p in PRESETS.items()}


def _scale(preset: str) -> int:
    return HESettings(preset=preset).effective_scale_bits()


def _roundtrip(ctx, vectors, weights, *, preset=DEFAULT_PRESET, seeded=True, scale_bits=None):
    """Encrypt on 'clients', aggregate with the public context, decrypt on a key holder."""
    scale_bits = _scale(preset) if scale_bits is None else scale_bits
    replies = [
        encrypt_update(ctx, v, int(w), scale_bits=scale_bits, max_abs_value=MAX_ABS,
                       max_weight=MAX_WEIGHT, seeded=seeded)
        for v, w in zip(vectors, weights, strict=True)
    ]
    # Everything travels as numpy arrays: go through the wire form both ways.
    replies = [EncryptedVector.from_arrays(r.to_arrays()) for r in replies]
    agg = aggregate(ctx.public_only(), replies, scale_bits=scale_bits, max_terms=100)
    agg = EncryptedVector.from_arrays(agg.to_arrays())
    return decrypt_mean(ctx, agg, max_weight=MAX_WEIGHT), agg


def _reference(vectors, weights):
    w = np.asarray(weights, dtype=np.float64)
    return sum(wi * v for wi, v in zip(w, vectors, strict=True)) / w.sum()


@pytest.mark.parametrize(
    ("dim", "k"),
    [(1, 1), (2047, 3), (2048, 2), (2049, 10), (20_000, 5)],
)
def test_mean_matches_plaintext_default_preset(keys, dim, k):
    rng = np.random.default_rng(dim * 31 + k)
    vectors = [rng.normal(0.0, 0.3, dim) for _ in range(k)]
    weights = rng.integers(20, 2000, k)
    res, agg = _roundtrip(keys[DEFAULT_PRESET], vectors, weights)
    ref = _reference(vectors, weights)
    err = np.max(np.abs(res.mean - ref))
    assert res.total_weight == int(weights.sum())
    assert agg.count == num_ciphertexts(dim, PRESETS[DEFAULT_PRESET].slots)
    assert err / np.max(np.abs(ref)) <= 1e-6
    assert err <= res.error_bound


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_within_its_bound_incl_extreme_weights(keys, preset):
    rng = np.random.default_rng(7)
    dim = 3000
    vectors = [rng.uniform(-MAX_ABS, MAX_ABS, dim) for _ in range(4)]
    for weights in ([1, 1, 1, 1], [1, MAX_WEIGHT, 1, MAX_WEIGHT], [MAX_WEIGHT] * 4):
        res, _ = _roundtrip(keys[preset], vectors, weights, preset=preset)
        err = np.max(np.abs(res.mean - _reference(vectors, weights)))
        assert err <= res.error_bound, (preset, weights, err, res.error_bound)
        if min(weights) == MAX_WEIGHT or preset == "precise":
            assert err / MAX_ABS <= 1e-6


def test_full_symmetric_ciphertexts_work_and_are_larger(keys):
    rng = np.random.default_rng(3)
    vectors = [rng.normal(0, 0.1, 5000) for _ in range(3)]
    res, _ = _roundtrip(keys[DEFAULT_PRESET], vectors, [5, 6, 7], seeded=False)
    assert np.max(np.abs(res.mean - _reference(vectors, [5, 6, 7]))) <= res.error_bound
    ctx = keys[DEFAULT_PRESET]
    kw = {"scale_bits": 30, "max_abs_value": MAX_ABS, "max_weight": MAX_WEIGHT}
    seeded = encrypt_update(ctx, vectors[0], 5, seeded=True, **kw)
    full = encrypt_update(ctx, vectors[0], 5, seeded=False, **kw)
    assert seeded.nbytes < 0.6 * full.nbytes


def test_byte_budget_of_default_preset(keys):
    # Full ciphertexts (2047 values + the check slot each, the weight slot last): the padding
    # of a partial last one is not counted.
    dim = 24 * 2047 - 1
    rng = np.random.default_rng(1)
    vectors = [rng.normal(0, 0.1, dim) for _ in range(2)]
    ctx = keys[DEFAULT_PRESET]
    up = encrypt_update(ctx, vectors[0], 10, scale_bits=30, max_abs_value=MAX_ABS,
                        max_weight=MAX_WEIGHT)
    _, agg = _roundtrip(ctx, vectors, [10, 20])
    assert up.nbytes / dim <= 16.0
    assert agg.nbytes / dim <= 28.0


def test_sum_at_capacity_does_not_wrap_and_beyond_it_does():
    """The capacity check is tight enough to matter: 2 bits above the safe scale wraps."""
    settings = HESettings(max_clients=6, max_weight=MAX_WEIGHT, max_abs_value=MAX_ABS)
    safe = settings.capacity().max_scale_bits
    ctx = generate_keys(PRESETS[DEFAULT_PRESET])
    dim = 1000
    vectors = [np.full(dim, MAX_ABS)] * 6
    weights = [MAX_WEIGHT] * 6

    def run(bits: int):
        replies = [
            encrypt_update(ctx, v, w, scale_bits=bits, max_abs_value=MAX_ABS,
                           max_weight=MAX_WEIGHT)
            for v, w in zip(vectors, weights, strict=True)
        ]
        agg = aggregate(ctx.public_only(), replies, scale_bits=bits, max_terms=6)
        return decrypt_mean(ctx, agg, max_weight=MAX_WEIGHT)

    res = run(safe)
    assert np.max(np.abs(res.mean - MAX_ABS)) <= res.error_bound
    with pytest.raises((CiphertextError, AssertionError)):
        bad = run(safe + 2)
        assert np.max(np.abs(bad.mean - MAX_ABS)) <= bad.error_bound


def test_noise_bound_is_not_wildly_loose(keys):
    """Measured max error is within 3x of the bound (the bound is 8 sigma, max of 1e5 ~4.5)."""
    rng = np.random.default_rng(11)
    dim, k = 100_000, 4
    vectors = [rng.normal(0, 0.1, dim) for _ in range(k)]
    res, _ = _roundtrip(keys[DEFAULT_PRESET], vectors, [1] * k)
    err = np.max(np.abs(res.mean - _reference(vectors, [1] * k)))
    assert res.error_bound / 3 <= err <= res.error_bound
    assert res.error_bound == pytest.approx(
        noise_bound(4096, k) / 2.0**_scale(DEFAULT_PRESET) / k
    )


def test_client_refuses_values_and_weights_outside_the_bounds(keys):
    ctx = keys[DEFAULT_PRESET]
    kw = {"scale_bits": 30, "max_abs_value": MAX_ABS, "max_weight": MAX_WEIGHT}
    with pytest.raises(ValueError, match="max_abs_value"):
        encrypt_update(ctx, np.array([0.0, 17.0]), 1, **kw)
    with pytest.raises(ValueError, match="max_weight"):
        encrypt_update(ctx, np.zeros(3), MAX_WEIGHT + 1, **kw)
    with pytest.raises(ValueError, match="max_weight"):
        encrypt_update(ctx, np.zeros(3), 0, **kw)
    with pytest.raises(ValueError, match="NaN"):
        encrypt_update(ctx, np.array([np.nan]), 1, **kw)


# ----------------------------------------------------------------- rejection of bad replies


@pytest.fixture(scope="module")
def replies(keys):
    ctx = keys[DEFAULT_PRESET]
    rng = np.random.default_rng(5)
    vecs = [rng.normal(0, 0.2, 4500) for _ in range(3)]
    out = [
        encrypt_update(ctx, v, 10 + i, scale_bits=30, max_abs_value=MAX_ABS,
                       max_weight=MAX_WEIGHT)
        for i, v in enumerate(vecs)
    ]
    return vecs, out


@pytest.fixture(scope="module")
def seal_replies(keys, replies):
    """The same updates as SEAL's own seeded ciphertexts (SEAL headers, SEAL's loader)."""
    vecs, _ = replies
    out = [
        encrypt_update(keys[DEFAULT_PRESET], v, 10 + i, scale_bits=30, max_abs_value=MAX_ABS,
                       max_weight=MAX_WEIGHT, kind="seeded")
        for i, v in enumerate(vecs)
    ]
    return vecs, out


def test_default_uplink_is_prg_within_the_byte_budget(replies, seal_replies):
    _, out = replies
    assert {r.kind for r in out} == {"prg"}
    assert {r.kind for r in seal_replies[1]} == {"seeded"}
    assert out[0].nbytes < seal_replies[1][0].nbytes  # smaller than SEAL's seeded form
    # Bytes per value slot (what a large model pays per parameter): 7-byte c0 + the key.
    slots = out[0].count * (PRESETS[DEFAULT_PRESET].slots - 1)
    assert 14.0 < out[0].nbytes / slots <= 14.1


def _arrays(ev: EncryptedVector) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in ev.to_arrays().items()}


def _with_meta(arrays, **changes):
    meta = json.loads(arrays["he.meta"].tobytes())
    meta.update(changes)
    arrays["he.meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
    return arrays


def _fix_digest(arrays):
    import hashlib

    return _with_meta(arrays, digest=hashlib.sha256(arrays["he.blob"].tobytes()).hexdigest())


def _sum(ctx, dim=4500):
    return EncryptedSum(ctx.public_only(), dim=dim, scale_bits=30, max_terms=100)


def test_reply_under_another_key_is_rejected(keys, replies):
    other = generate_keys(PRESETS[DEFAULT_PRESET])
    vec = replies[0][0]
    foreign = encrypt_update(other, vec, 3, scale_bits=30, max_abs_value=MAX_ABS,
                             max_weight=MAX_WEIGHT)
    acc = _sum(keys[DEFAULT_PRESET])
    with pytest.raises(CiphertextError, match="another key"):
        acc.add(EncryptedVector.from_arrays(foreign.to_arrays()))


@pytest.mark.parametrize(("kind", "match"), [("seeded", r"deserialise|parameter level"),
                                           ("prg", "another preset")])
def test_reply_under_another_preset_with_forged_fingerprint_is_rejected(keys, replies, kind,
                                                                         match):
    ctx = keys[DEFAULT_PRESET]
    vec = replies[0][0]
    foreign = encrypt_update(keys["precise"], vec, 3, scale_bits=30, max_abs_value=MAX_ABS,
                             max_weight=MAX_WEIGHT, kind=kind)
    # Same number of ciphertexts (same N), fingerprint forged to ours: the parameter id (SEAL
    # form) or the coefficient width of the other prime (prg form) gives it away.
    arrays = _with_meta(_arrays(foreign), fingerprint=ctx.fingerprint)
    for backend in ("limbs", "seal"):
        acc = EncryptedSum(ctx.public_only(), dim=4500, scale_bits=30, max_terms=100,
                           backend=backend)
        with pytest.raises(CiphertextError, match=match if backend == "limbs" or kind == "seeded"
                           else "bytes, expected"):
            acc.add(EncryptedVector.from_arrays(arrays))


def test_truncated_reply_is_rejected(keys, replies):
    arrays = _arrays(replies[1][0])
    arrays["he.blob"] = arrays["he.blob"][:-100]
    with pytest.raises(CiphertextError, match="truncated"):
        EncryptedVector.from_arrays(arrays)
    # Truncated consistently (lengths and digest fixed up): SEAL's size field catches it.
    arrays = _arrays(replies[1][0])
    arrays["he.blob"] = arrays["he.blob"][:-100]
    arrays["he.lengths"][-1] -= 100
    ev = EncryptedVector.from_arrays(_fix_digest(arrays))
    with pytest.raises(CiphertextError, match="truncated"):
        _sum(keys[DEFAULT_PRESET]).add(ev)


def test_tampered_reply_is_rejected(keys, replies, seal_replies):
    arrays = _arrays(replies[1][0])
    arrays["he.blob"][500] ^= 0x01
    with pytest.raises(CiphertextError, match="digest"):
        EncryptedVector.from_arrays(arrays)
    # Header tampered and the digest recomputed: structure checks still refuse it.
    arrays = _arrays(seal_replies[1][0])
    arrays["he.blob"][0] ^= 0xFF
    with pytest.raises(CiphertextError, match="magic"):
        _sum(keys[DEFAULT_PRESET]).add(EncryptedVector.from_arrays(_fix_digest(arrays)))
    # prg form: a coefficient pushed above its prime (7 bytes of 0xFF > the 55-bit prime).
    arrays = _arrays(replies[1][0])
    arrays["he.blob"][40:47] = 0xFF
    with pytest.raises(CiphertextError, match=r"ciphertext 0: .*modulus"):
        _sum(keys[DEFAULT_PRESET]).add(EncryptedVector.from_arrays(_fix_digest(arrays)))


def test_wrong_count_dim_scale_are_rejected(keys, replies):
    ctx = keys[DEFAULT_PRESET]
    good = replies[1][0]
    arrays = _arrays(good)
    lengths, blob = arrays["he.lengths"], arrays["he.blob"]
    arrays["he.lengths"] = lengths[:-1]
    arrays["he.blob"] = blob[: int(lengths[:-1].sum())]
    arrays = _fix_digest(_with_meta(arrays, count=len(lengths) - 1))
    with pytest.raises(CiphertextError, match="ciphertexts, expected"):
        _sum(ctx).add(EncryptedVector.from_arrays(arrays))
    with pytest.raises(CiphertextError, match="vector length"):
        _sum(ctx, dim=4400).add(good)
    with pytest.raises(CiphertextError, match="scale"):
        EncryptedSum(ctx.public_only(), dim=4500, scale_bits=31, max_terms=9).add(good)
    with pytest.raises(CiphertextError, match="expected"):
        EncryptedVector.from_arrays({"he.blob": blob})


def test_bad_reply_leaves_running_sum_untouched(keys, replies):
    ctx = keys[DEFAULT_PRESET]
    vecs, good = replies
    acc = _sum(ctx)
    acc.add(good[0])
    arrays = _arrays(good[1])
    # Corrupt the last ciphertext only: the first ones load fine, the reply is still refused.
    arrays["he.blob"][-30:] = 0xFF
    with pytest.raises(CiphertextError):
        acc.add(EncryptedVector.from_arrays(_fix_digest(arrays)))
    acc.add(good[2])
    res = decrypt_mean(ctx, acc.result())
    ref = _reference([vecs[0], vecs[2]], [10, 12])
    assert res.total_weight == 22
    assert np.max(np.abs(res.mean - ref)) <= res.error_bound


def test_too_many_replies_are_refused(keys, replies):
    ctx = keys[DEFAULT_PRESET]
    acc = EncryptedSum(ctx.public_only(), dim=4500, scale_bits=30, max_terms=2)
    acc.add(replies[1][0])
    acc.add(replies[1][1])
    with pytest.raises(CiphertextError, match="max_clients"):
        acc.add(replies[1][2])


def test_packed_aggregate_with_out_of_range_coefficient_is_rejected(keys, replies):
    ctx = keys[DEFAULT_PRESET]
    agg = aggregate(ctx.public_only(), replies[1], scale_bits=30, max_terms=9)
    arrays = _arrays(agg)
    # First coefficient := 2^55 - 1 (> the 55-bit prime): its 6 low bytes and its 7 high bits,
    # which sit after the N low parts (layout of pack_uint).
    n = PRESETS[DEFAULT_PRESET].poly_modulus_degree
    arrays["he.blob"][8:14] = 0xFF
    arrays["he.blob"][8 + 6 * n] |= 0x7F
    with pytest.raises(CiphertextError, match="modulus"):
        decrypt_mean(ctx, EncryptedVector.from_arrays(_fix_digest(arrays)))
    # And a client reply is never accepted as an aggregate input in packed form.
    with pytest.raises(CiphertextError, match="seeded/full"):
        _sum(ctx).add(agg)


@pytest.mark.parametrize("bits", [14, 40, 49, 54, 55, 56, 60, 64])
def test_bit_packing_roundtrip(bits):
    rng = np.random.default_rng(bits)
    hi = 2**bits - 1
    v = rng.integers(0, 2**63 - 1, 4096, dtype=np.uint64) & np.uint64(hi)
    v[:3] = [0, hi, hi - 1]
    packed = pack_uint(v, bits)
    assert len(packed) == 4096 * bits // 8
    assert np.array_equal(unpack_uint(packed, bits, 4096), v)
    with pytest.raises(ValueError):
        unpack_uint(packed[:-1], bits, 4096)
