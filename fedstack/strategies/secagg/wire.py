"""Flat wire encoding of protocol messages: ``dict[str, int | bytes]`` entries.

Flower's ConfigRecord holds exactly such values, but its integers are signed 64-bit while
node ids are unsigned 64-bit, so id lists travel as little-endian uint64 bytes. Keeping this
module free of Flower makes every decoder testable alone; each one validates sizes, counts
and duplicates and raises :class:`ProtocolViolation` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedstack.crypto.keys import KEY_BYTES
from fedstack.crypto.shamir import SHARE_BYTES

from .errors import ProtocolViolation
from .messages import (
    SEED_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    Advert,
    MaskRequest,
    ShareReply,
    ShareRequest,
    UnmaskReply,
    UnmaskRequest,
    check_bytes,
    check_shares,
)

Wire = dict[str, int | bytes | str]
ID_BYTES = 8
KEY_ENTRY_BYTES = ID_BYTES + 2 * KEY_BYTES

# Request parts (server -> client) and reply parts (client -> server), by key prefix.
ADVERTISE_REQ = "areq.round"
SHARE_REQ = "sreq.round"
MASK_REQ = "mreq.round"
UNMASK_REQ = "ureq.round"
ADVERT = "adv.round"
SHARE_REP = "srep.round"
MASKED = "masked.round"
UNMASK_REP = "urep.round"
FAILED = "failed"


def ids_to_bytes(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<u8").tobytes()


def ids_from_bytes(data: object, what: str) -> list[int]:
    if not isinstance(data, bytes) or len(data) % ID_BYTES:
        raise ProtocolViolation(f"{what} must be a multiple of {ID_BYTES} bytes")
    ids = [int(v) for v in np.frombuffer(data, dtype="<u8")]
    if len(set(ids)) != len(ids):
        raise ProtocolViolation(f"{what} lists a node twice")
    return ids


def get_round(wire: Mapping, key: str) -> int:
    value = wire.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolViolation(f"'{key}' must be a non-negative int, got {value!r}")
    return int(value)


def _chunks(data: object, size: int, count: int, what: str) -> list[bytes]:
    if not isinstance(data, bytes) or len(data) != size * count:
        raise ProtocolViolation(f"{what} must be {count} x {size} bytes")
    return [data[i * size : (i + 1) * size] for i in range(count)]


# -- adverts -----------------------------------------------------------------------------
def encode_advert(adv: Advert) -> Wire:
    return {ADVERT: adv.round_num, "adv.enc_pk": adv.enc_pk, "adv.mask_pk": adv.mask_pk}


def decode_advert(wire: Mapping, node: int) -> Advert:
    adv = Advert(
        node,
        get_round(wire, ADVERT),
        check_bytes(wire.get("adv.enc_pk"), KEY_BYTES, "adv.enc_pk"),
        check_bytes(wire.get("adv.mask_pk"), KEY_BYTES, "adv.mask_pk"),
    )
    adv.validate()
    return adv


# -- share stage -------------------------------------------------------------------------
def encode_share_request(req: ShareRequest) -> Wire:
    keys = b"".join(
        int(v).to_bytes(ID_BYTES, "little") + enc + mask
        for v, (enc, mask) in sorted(req.keys.items())
    )
    return {
        SHARE_REQ: req.round_num,
        "sreq.seed": req.seed,
        "sreq.participants": ids_to_bytes(req.participants),
        "sreq.keys": keys,
    }


def decode_share_request(wire: Mapping) -> ShareRequest:
    raw = wire.get("sreq.keys")
    if not isinstance(raw, bytes) or len(raw) % KEY_ENTRY_BYTES:
        raise ProtocolViolation(f"sreq.keys must be a multiple of {KEY_ENTRY_BYTES} bytes")
    keys: dict[int, tuple[bytes, bytes]] = {}
    for entry in _chunks(raw, KEY_ENTRY_BYTES, len(raw) // KEY_ENTRY_BYTES, "sreq.keys"):
        node = int.from_bytes(entry[:ID_BYTES], "little")
        if node in keys:
            raise ProtocolViolation("sreq.keys lists a node twice")
        keys[node] = (entry[ID_BYTES : ID_BYTES + KEY_BYTES], entry[ID_BYTES + KEY_BYTES :])
    return ShareRequest(
        get_round(wire, SHARE_REQ),
        check_bytes(wire.get("sreq.seed"), SEED_BYTES, "sreq.seed"),
        ids_from_bytes(wire.get("sreq.participants"), "sreq.participants"),
        keys,
    )


def encode_share_reply(rep: ShareReply) -> Wire:
    receivers = sorted(rep.ciphertexts)
    return {
        SHARE_REP: rep.round_num,
        "srep.receivers": ids_to_bytes(receivers),
        "srep.cts": b"".join(rep.ciphertexts[v] for v in receivers),
    }


def decode_share_reply(wire: Mapping, node: int) -> ShareReply:
    receivers = ids_from_bytes(wire.get("srep.receivers"), "srep.receivers")
    cts = _chunks(wire.get("srep.cts"), SHARE_CIPHERTEXT_BYTES, len(receivers), "srep.cts")
    return ShareReply(node, get_round(wire, SHARE_REP), dict(zip(receivers, cts, strict=True)))


# -- masked-input stage ------------------------------------------------------------------
def encode_mask_request(req: MaskRequest) -> Wire:
    senders = sorted(req.ciphertexts)
    return {
        MASK_REQ: req.round_num,
        "mreq.shared": ids_to_bytes(req.shared),
        "mreq.senders": ids_to_bytes(senders),
        "mreq.cts": b"".join(req.ciphertexts[v] for v in senders),
    }


def decode_mask_request(wire: Mapping) -> MaskRequest:
    senders = ids_from_bytes(wire.get("mreq.senders"), "mreq.senders")
    cts = _chunks(wire.get("mreq.cts"), SHARE_CIPHERTEXT_BYTES, len(senders), "mreq.cts")
    return MaskRequest(
        get_round(wire, MASK_REQ),
        ids_from_bytes(wire.get("mreq.shared"), "mreq.shared"),
        dict(zip(senders, cts, strict=True)),
    )


# -- unmask stage ------------------------------------------------------------------------
def encode_unmask_request(req: UnmaskRequest) -> Wire:
    return {
        UNMASK_REQ: req.round_num,
        "ureq.self": ids_to_bytes(req.reveal_self),
        "ureq.key": ids_to_bytes(req.reveal_key),
    }


def decode_unmask_request(wire: Mapping) -> UnmaskRequest:
    return UnmaskRequest(
        get_round(wire, UNMASK_REQ),
        ids_from_bytes(wire.get("ureq.self"), "ureq.self"),
        ids_from_bytes(wire.get("ureq.key"), "ureq.key"),
    )


def _pack_shares(shares: dict[int, np.ndarray]) -> tuple[bytes, bytes]:
    owners = sorted(shares)
    return ids_to_bytes(owners), b"".join(shares[v].astype("<u4").tobytes() for v in owners)


def _unpack_shares(wire: Mapping, kind: str) -> dict[int, np.ndarray]:
    owners = ids_from_bytes(wire.get(f"urep.{kind}_owners"), f"urep.{kind}_owners")
    blobs = _chunks(
        wire.get(f"urep.{kind}_shares"), SHARE_BYTES, len(owners), f"urep.{kind}_shares"
    )
    shares = {
        v: np.frombuffer(b, dtype="<u4").astype(np.uint32)
        for v, b in zip(owners, blobs, strict=True)
    }
    check_shares(shares, f"{kind} share of")
    return shares


def encode_unmask_reply(rep: UnmaskReply) -> Wire:
    so, ss = _pack_shares(rep.self_shares)
    ko, ks = _pack_shares(rep.key_shares)
    return {
        UNMASK_REP: rep.round_num,
        "urep.self_owners": so,
        "urep.self_shares": ss,
        "urep.key_owners": ko,
        "urep.key_shares": ks,
    }


def decode_unmask_reply(wire: Mapping, node: int) -> UnmaskReply:
    return UnmaskReply(
        node, get_round(wire, UNMASK_REP), _unpack_shares(wire, "self"), _unpack_shares(wire, "key")
    )
