"""X25519 key agreement and HKDF-SHA256 key derivation.

Why X25519: 32-byte keys, constant-time, and the only curve operation the protocol needs
is a Diffie-Hellman agreement. The raw 32-byte shared secret is never used directly: HKDF
binds every derived key to its purpose, the round and the (ordered) party ids, so the same
agreement can never yield the same key for two different uses or rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
"""Size of X25519 private/public keys, of the shared secret and of every derived key."""

HKDF_SALT = b"fedstack/secagg/v1"
"""Fixed, public domain-separation salt (RFC 5869 allows a non-secret constant salt)."""


@dataclass(frozen=True)
class KeyPair:
    """A raw X25519 key pair; bytes so that it serialises into a client's state as is."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the OS CSPRNG (inside ``cryptography``)."""
        sk = X25519PrivateKey.generate()
        return cls(private=sk.private_bytes_raw(), public=sk.public_key().public_bytes_raw())

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        """Rebuild the pair from its private half (e.g. after Shamir reconstruction)."""
        sk = X25519PrivateKey.from_private_bytes(_check_len(private, "private key"))
        return cls(private=bytes(private), public=sk.public_key().public_bytes_raw())


def _check_len(data: bytes, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray) or len(data) != KEY_BYTES:
        raise ValueError(
            f"{what} must be {KEY_BYTES} bytes, got {type(data).__name__} "
            f"of length {len(data) if hasattr(data, '__len__') else '?'}"
        )
    return bytes(data)


def agree(private: bytes, peer_public: bytes) -> bytes:
    """The 32-byte X25519 shared secret; rejects low-order peer keys (all-zero output)."""
    sk = X25519PrivateKey.from_private_bytes(_check_len(private, "private key"))
    pk = X25519PublicKey.from_public_bytes(_check_len(peer_public, "peer public key"))
    # cryptography raises ValueError itself when the result is all zeros (small-order point).
    return sk.exchange(pk)


def context_info(purpose: str, round_num: int, ids: tuple[int, ...]) -> bytes:
    """Unambiguous HKDF ``info``: purpose | round | ids, fixed-width so no two contexts collide."""
    if "|" in purpose:
        raise ValueError(f"purpose must not contain '|': {purpose!r}")
    parts = [purpose.encode(), round_num.to_bytes(8, "big", signed=False)]
    parts += [int(i).to_bytes(8, "big", signed=False) for i in ids]
    return b"|".join(parts)


def derive_key(secret: bytes, purpose: str, round_num: int, ids: tuple[int, ...]) -> bytes:
    """HKDF-SHA256 over the full 256-bit secret, bound to purpose, round and party ids."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=HKDF_SALT,
        info=context_info(purpose, round_num, ids),
    )
    return hkdf.derive(_check_len(secret, "shared secret"))


def pair_keys(
    private: bytes, own_id: int, peers: dict[int, bytes], purpose: str, round_num: int
) -> dict[int, bytes]:
    """:func:`pair_key` with every peer (id -> public key); parses the private key once."""
    sk = X25519PrivateKey.from_private_bytes(_check_len(private, "private key"))
    out = {}
    for peer, public in peers.items():
        secret = sk.exchange(
            X25519PublicKey.from_public_bytes(_check_len(public, "peer public key"))
        )
        lo, hi = sorted((int(own_id), int(peer)))
        out[peer] = derive_key(secret, purpose, round_num, (lo, hi))
    return out


def pair_key(
    private: bytes, peer_public: bytes, purpose: str, round_num: int, id_a: int, id_b: int
) -> bytes:
    """Key shared by parties a and b: agreement + HKDF with the ids in canonical order.

    Sorting the ids makes both ends derive the same key without agreeing on who is "first".
    """
    lo, hi = sorted((int(id_a), int(id_b)))
    return derive_key(agree(private, peer_public), purpose, round_num, (lo, hi))
