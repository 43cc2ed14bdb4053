"""X25519 agreement and HKDF context binding."""

import pytest

from fedstack.crypto.keys import KEY_BYTES, KeyPair, agree, context_info, derive_key, pair_key


def test_agreement_is_symmetric_and_keys_are_fresh():
    a, b = KeyPair.generate(), KeyPair.generate()
    assert agree(a.private, b.public) == agree(b.private, a.public)
    assert len(agree(a.private, b.public)) == KEY_BYTES
    assert a.public != b.public and a.private != b.private


def test_private_key_roundtrip_rebuilds_public_key():
    a = KeyPair.generate()
    assert KeyPair.from_private(a.private) == a


def test_derived_keys_are_bound_to_purpose_round_and_ids():
    secret = bytes(range(32))
    base = derive_key(secret, "mask", 3, (1, 2))
    assert len(base) == KEY_BYTES
    assert derive_key(secret, "mask", 3, (1, 2)) == base
    assert derive_key(secret, "enc", 3, (1, 2)) != base
    assert derive_key(secret, "mask", 4, (1, 2)) != base
    assert derive_key(secret, "mask", 3, (1, 3)) != base
    assert derive_key(secret, "mask", 3, (2, 1)) != base
    # fixed-width encoding: ids (1, 2) and (12,) cannot collide
    assert context_info("p", 1, (1, 2)) != context_info("p", 1, (12,))


def test_pair_key_agrees_regardless_of_id_order():
    a, b = KeyPair.generate(), KeyPair.generate()
    assert pair_key(a.private, b.public, "m", 1, 7, 9) == pair_key(
        b.private, a.public, "m", 1, 9, 7
    )


def test_low_order_and_malformed_keys_are_rejected():
    a = KeyPair.generate()
    with pytest.raises(ValueError):
        agree(a.private, bytes(32))  # the all-zero point yields an all-zero secret
    with pytest.raises(ValueError):
        agree(a.private, b"short")
    with pytest.raises(ValueError):
        context_info("a|b", 1, ())
