"""Protocol messages, one dataclass per stage, independent of any transport.

The Flower strategy and mod translate these to and from RecordDicts; the in-process
simulation passes them directly. Structural checks that need no protocol state live here;
checks against a party's state (round, stage, sender sets) live in ``client``/``server``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedstack.crypto.aead import AEAD_NONCE_BYTES, AEAD_TAG_BYTES
from fedstack.crypto.keys import KEY_BYTES
from fedstack.crypto.shamir import NUM_LIMBS, PRIME, SHARE_BYTES
from fedstack.crypto.signing import PUBLIC_KEY_BYTES, SIGNATURE_BYTES

from .errors import ProtocolViolation

# Stage names, used in messages, logs and errors.
STAGE_ADVERTISE = "advertise"
STAGE_SHARE = "share"
STAGE_MASKED = "masked-input"
STAGE_UNMASK = "unmask"
STAGES = (STAGE_ADVERTISE, STAGE_SHARE, STAGE_MASKED, STAGE_UNMASK)
# security=malicious adds: the graph-seed reveal (sparse graphs) and the consistency check.
STAGE_REVEAL = "reveal"
STAGE_CONSISTENCY = "consistency"
MALICIOUS_STAGES = (
    STAGE_ADVERTISE, STAGE_REVEAL, STAGE_SHARE, STAGE_MASKED, STAGE_CONSISTENCY, STAGE_UNMASK
)

SHARE_HEADER_BYTES = 24  # sender | receiver | round, 8 bytes each
SHARE_PLAINTEXT_BYTES = SHARE_HEADER_BYTES + 2 * SHARE_BYTES
SHARE_CIPHERTEXT_BYTES = AEAD_NONCE_BYTES + SHARE_PLAINTEXT_BYTES + AEAD_TAG_BYTES
SEED_BYTES = 32
NONCE_BYTES = 32  # graph-seed contribution, committed to as SHA-256(nonce) in the advert
COMMIT_BYTES = 32


def check_node_id(value: object, what: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or not 0 <= int(value) < 2**64
    ):
        raise ProtocolViolation(f"{what} must be a uint64 node id, got {value!r}")
    return int(value)


def check_id_list(values: object, what: str) -> list[int]:
    """A sorted list of distinct node ids (sorted so both ends iterate identically)."""
    if not isinstance(values, list | tuple):
        raise ProtocolViolation(f"{what} must be a list of node ids")
    ids = [check_node_id(v, what) for v in values]
    if ids != sorted(set(ids)):
        raise ProtocolViolation(f"{what} must be sorted and free of duplicates")
    return ids


def check_bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        got = len(value) if isinstance(value, bytes) else type(value).__name__
        raise ProtocolViolation(f"{what} must be {size} bytes, got {got}")
    return value


def check_share(value: object, what: str) -> np.ndarray:
    """One Shamir share: NUM_LIMBS uint32 field elements."""
    if not isinstance(value, np.ndarray) or value.dtype != np.uint32 or value.shape != (NUM_LIMBS,):
        raise ProtocolViolation(f"{what} must be a uint32 array of shape ({NUM_LIMBS},)")
    if (value.astype(np.uint64) >= PRIME).any():
        raise ProtocolViolation(f"{what} holds a value outside the Shamir field")
    return value


def check_shares(values: dict[int, object], what: str) -> None:
    """:func:`check_share` for every value of ``values``, with one vectorised field check.

    Why: a server unmasking 1000 parties checks ~k shares per reply; one comparison per
    reply instead of per share cut that check from a sixth of the unmasking's fixed cost.
    """
    for v, share in values.items():
        if (
            not isinstance(share, np.ndarray)
            or share.dtype != np.uint32
            or share.shape != (NUM_LIMBS,)
        ):
            raise ProtocolViolation(f"{what} {v} must be a uint32 array of shape ({NUM_LIMBS},)")
    if not values:
        return
    outside = (np.stack(list(values.values())) >= np.uint32(PRIME)).any(axis=1)
    if outside.any():
        v = list(values)[int(np.argmax(outside))]
        raise ProtocolViolation(f"{what} {v} holds a value outside the Shamir field")


@dataclass(frozen=True)
class Advert:
    """Client -> server: fresh public keys for one round (encryption, masking).

    Under ``security=malicious`` it also carries the commitment SHA-256(nonce) to the
    client's graph-seed contribution, the public key of the roster member that signs it
    (``signer``) and that member's signature over (run, round, node, keys, commitment).
    """

    node: int
    round_num: int
    enc_pk: bytes
    mask_pk: bytes
    commit: bytes = b""
    signer: bytes = b""
    signature: bytes = b""

    @property
    def signed(self) -> bool:
        return bool(self.signer or self.signature or self.commit)

    def validate(self) -> None:
        check_node_id(self.node, "advert sender")
        check_bytes(self.enc_pk, KEY_BYTES, "advert enc_pk")
        check_bytes(self.mask_pk, KEY_BYTES, "advert mask_pk")
        if self.enc_pk == self.mask_pk:
            raise ProtocolViolation("advert reuses one key for encryption and masking", "keys")
        if self.signed:
            check_bytes(self.commit, COMMIT_BYTES, "advert commitment")
            check_bytes(self.signer, PUBLIC_KEY_BYTES, "advert signer")
            check_bytes(self.signature, SIGNATURE_BYTES, "advert signature")


@dataclass(frozen=True)
class RevealRequest:
    """Server -> client (malicious, sparse): the fixed participant set P and its adverts;
    the client answers with its graph-seed nonce, signed over the digest of P."""

    round_num: int
    participants: list[int]
    adverts: dict[int, Advert]


@dataclass(frozen=True)
class RevealReply:
    """Client -> server: the nonce behind the advert's commitment, signed over digest(P)."""

    node: int
    round_num: int
    nonce: bytes
    signature: bytes


@dataclass(frozen=True)
class ShareRequest:
    """Server -> client: the round's participants, graph seed and neighbourhood keys."""

    round_num: int
    seed: bytes
    participants: list[int]
    keys: dict[int, tuple[bytes, bytes]]  # node -> (enc_pk, mask_pk), the receiver's neighbourhood
    # security=malicious: every participant's signed advert (the keys come from these) and,
    # for sparse graphs, every participant's (nonce, signature) reveal.
    adverts: dict[int, Advert] = field(default_factory=dict)
    reveals: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class ShareReply:
    """Client -> server: one AEAD ciphertext of (self-mask share, mask-key share) per neighbour."""

    node: int
    round_num: int
    ciphertexts: dict[int, bytes]  # receiver -> ciphertext


@dataclass(frozen=True)
class MaskRequest:
    """Server -> client (rides on the train message): U1 and the ciphertexts routed to it."""

    round_num: int
    shared: list[int]  # U1: parties whose shares were routed
    ciphertexts: dict[int, bytes]  # sender -> ciphertext addressed to the receiver


@dataclass(frozen=True)
class MaskedInput:
    """Client -> server: the masked ring vector (d quantised coordinates + the weight)."""

    node: int
    round_num: int
    words: np.ndarray


@dataclass(frozen=True)
class ConsistencyRequest:
    """Server -> client (malicious): the survivor view to sign -- U1 (shared) and U3 (sent a
    masked input)."""

    round_num: int
    shared: list[int]
    survivors: list[int]


@dataclass(frozen=True)
class ConsistencyReply:
    """Client -> server: its signature on digest(P, seed, U1, U3), given once per round."""

    node: int
    round_num: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> client: whose self-mask shares and whose mask-key shares to reveal.

    Under ``security=malicious`` the client computes both lists from its own signed view
    (and refuses lists that differ) and needs ``signatures``: every survivor's signature on
    that view, for each survivor of its neighbourhood.
    """

    round_num: int
    reveal_self: list[int]  # survivors (sent a masked input): self-mask seed shares
    reveal_key: list[int]  # dropped after sharing: mask-key shares
    signatures: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class UnmaskReply:
    """Client -> server: the requested shares."""

    node: int
    round_num: int
    self_shares: dict[int, np.ndarray]
    key_shares: dict[int, np.ndarray]
