"""AES-GCM share encryption: associated data binds sender, receiver and round."""

import os

import pytest

from fedstack.crypto.aead import AeadError, associated_data, open_sealed, seal


def test_roundtrip_and_fresh_nonces():
    key = os.urandom(32)
    ad = associated_data("share", 3, 10, 20)
    c1, c2 = seal(key, b"secret share", ad), seal(key, b"secret share", ad)
    assert c1 != c2  # random nonce per message
    assert open_sealed(key, c1, ad) == b"secret share"


@pytest.mark.parametrize(
    "other",
    [("share", 4, 10, 20), ("share", 3, 11, 20), ("share", 3, 20, 10), ("other", 3, 10, 20)],
)
def test_replay_into_another_context_fails(other):
    key = os.urandom(32)
    ct = seal(key, b"x" * 72, associated_data("share", 3, 10, 20))
    with pytest.raises(AeadError):
        open_sealed(key, ct, associated_data(*other))


def test_any_bit_flip_fails():
    key = os.urandom(32)
    ad = associated_data("share", 1, 1, 2)
    ct = seal(key, b"y" * 40, ad)
    for pos in (0, 12, len(ct) - 1):
        bad = bytearray(ct)
        bad[pos] ^= 1
        with pytest.raises(AeadError):
            open_sealed(key, bytes(bad), ad)
    with pytest.raises(AeadError):
        open_sealed(os.urandom(32), ct, ad)
    with pytest.raises(AeadError):
        open_sealed(key, ct[:20], ad)
