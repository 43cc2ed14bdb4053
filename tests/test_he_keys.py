"""CKKS key files: the server's context is public only and cannot decrypt; clear load errors."""

from __future__ import annotations

import stat

import numpy as np
import pytest

from fedstack.strategies.he.ckks import aggregate, decrypt_mean, encrypt_update
from fedstack.strategies.he.keys import (
    PUBLIC_CONTEXT_FILENAME,
    SECRET_CONTEXT_FILENAME,
    HEKeyError,
    PublicContext,
    SecretContext,
    generate_keys,
    load_public_context,
    load_secret_context,
    write_contexts,
)
from fedstack.strategies.he.presets import (
    HE_STANDARD_MAX_COEFF_BITS_128,
    PRESETS,
    CKKSPreset,
)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    ctx = generate_keys(PRESETS["standard"])
    write_contexts(ctx, out)
    return out, ctx


def test_presets_are_128_bit_secure_and_seal_agrees():
    import tenseal.sealapi as s

    assert HE_STANDARD_MAX_COEFF_BITS_128[2048] == 54
    assert HE_STANDARD_MAX_COEFF_BITS_128[4096] == 109
    assert HE_STANDARD_MAX_COEFF_BITS_128[8192] == 218
    for n, bits in HE_STANDARD_MAX_COEFF_BITS_128.items():
        if n >= 2048:
            assert s.CoeffModulus.MaxBitCount(n, s.SEC_LEVEL_TYPE.TC128) == bits
    for preset in PRESETS.values():
        preset.check_security()
    insecure = CKKSPreset("x", 2048, (40, 20), 25, "too many bits for N=2048")
    with pytest.raises(ValueError, match="128-bit"):
        insecure.check_security()


def test_files_roundtrip_with_matching_fingerprints(key_dir):
    out, ctx = key_dir
    secret = load_secret_context(out / SECRET_CONTEXT_FILENAME)
    public = load_public_context(out / PUBLIC_CONTEXT_FILENAME)
    assert isinstance(secret, SecretContext)
    assert type(public) is PublicContext
    assert secret.fingerprint == public.fingerprint == ctx.fingerprint
    assert stat.S_IMODE((out / SECRET_CONTEXT_FILENAME).stat().st_mode) == 0o600
    # The loaded secret key decrypts what the generated one encrypted.
    v = np.linspace(-1, 1, 3000)
    enc = encrypt_update(ctx, v, 4, scale_bits=30, max_abs_value=2, max_weight=10)
    agg = aggregate(public, [enc], scale_bits=30, max_terms=1)
    res = decrypt_mean(secret, agg)
    assert np.max(np.abs(res.mean - v)) <= res.error_bound


def test_server_context_cannot_decrypt_and_holds_no_secret(key_dir):
    out, ctx = key_dir
    public = load_public_context(out / PUBLIC_CONTEXT_FILENAME)
    enc = encrypt_update(ctx, np.ones(10), 1, scale_bits=30, max_abs_value=2, max_weight=10)
    agg = aggregate(public, [enc], scale_bits=30, max_terms=1)
    with pytest.raises(HEKeyError, match="cannot decrypt"):
        decrypt_mean(public, agg)
    with pytest.raises(HEKeyError, match="secret"):
        encrypt_update(public, np.ones(3), 1, scale_bits=30, max_abs_value=2, max_weight=10)
    assert not hasattr(public, "secret_key")
    # Neither the server's file nor anything it sends or receives contains the secret key.
    secret_bytes = ctx.secret_key_bytes
    assert len(secret_bytes) > 1000
    probe = secret_bytes[-64:]  # a slice of the (compressed) key material
    server_seen = [
        (out / PUBLIC_CONTEXT_FILENAME).read_bytes(),
        enc.blob.tobytes(),
        agg.blob.tobytes(),
    ]
    assert all(probe not in blob for blob in server_seen)
    # A SecretContext's public view is a separate object without the key.
    assert type(ctx.public_only()) is PublicContext


def test_server_refuses_a_secret_context(key_dir):
    out, _ = key_dir
    with pytest.raises(HEKeyError, match="SECRET context"):
        load_public_context(out / SECRET_CONTEXT_FILENAME)


def test_client_refuses_a_public_context(key_dir):
    out, _ = key_dir
    with pytest.raises(HEKeyError, match="PUBLIC context"):
        load_secret_context(out / PUBLIC_CONTEXT_FILENAME)


def test_missing_wrong_and_corrupted_files(key_dir, tmp_path):
    out, _ = key_dir
    with pytest.raises(HEKeyError, match="does not exist"):
        load_public_context(tmp_path / "nope.ckks")
    junk = tmp_path / "junk.ckks"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(HEKeyError, match="not a fedstack CKKS context"):
        load_public_context(junk)
    data = bytearray((out / PUBLIC_CONTEXT_FILENAME).read_bytes())
    data[-50] ^= 0x10  # inside the public key section
    bad = tmp_path / "bad.ckks"
    bad.write_bytes(bytes(data))
    with pytest.raises(HEKeyError, match="fingerprint"):
        load_public_context(bad)
    short = tmp_path / "short.ckks"
    short.write_bytes(bytes(data[:-1000]))
    with pytest.raises(HEKeyError, match="truncated"):
        load_public_context(short)


def test_write_refuses_to_overwrite(key_dir):
    out, ctx = key_dir
    with pytest.raises(HEKeyError, match="refusing to overwrite"):
        write_contexts(ctx, out)


def test_keys_differ_between_generations():
    a = generate_keys(PRESETS["compact"])
    b = generate_keys(PRESETS["compact"])
    assert a.fingerprint != b.fingerprint
    assert a.secret_key_bytes != b.secret_key_bytes
