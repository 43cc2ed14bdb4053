"""AES-256-GCM authenticated encryption of Shamir shares routed through the server.

Why associated data: the server relays every share ciphertext, so it could swap senders,
receivers or rounds. Binding (purpose, round, sender, receiver) as GCM associated data makes
any such replay or re-routing fail authentication at the receiver, as does any bit flip.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

AEAD_KEY_BYTES = 32
AEAD_NONCE_BYTES = 12
AEAD_TAG_BYTES = 16


class AeadError(ValueError):
    """A ciphertext failed authentication (tampered, replayed or mis-routed)."""


def associated_data(purpose: str, round_num: int, sender: int, receiver: int) -> bytes:
    """Fixed-width encoding of the context a share ciphertext is bound to."""
    return (
        purpose.encode()
        + b"|"
        + round_num.to_bytes(8, "big")
        + sender.to_bytes(8, "big")
        + receiver.to_bytes(8, "big")
    )


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """nonce || AES-GCM(plaintext, ad); a random 96-bit nonce per message."""
    if len(key) != AEAD_KEY_BYTES:
        raise ValueError(f"AEAD key must be {AEAD_KEY_BYTES} bytes, got {len(key)}")
    nonce = os.urandom(AEAD_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Decrypt and authenticate; raises :class:`AeadError` on any mismatch."""
    if len(key) != AEAD_KEY_BYTES:
        raise ValueError(f"AEAD key must be {AEAD_KEY_BYTES} bytes, got {len(key)}")
    if len(ciphertext) < AEAD_NONCE_BYTES + AEAD_TAG_BYTES:
        raise AeadError(f"ciphertext too short ({len(ciphertext)} bytes)")
    nonce, body = ciphertext[:AEAD_NONCE_BYTES], ciphertext[AEAD_NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, ad)
    except InvalidTag as exc:
        raise AeadError(
            "share ciphertext failed authentication "
            "(tampered, replayed from another round/party, or wrong key)"
        ) from exc
