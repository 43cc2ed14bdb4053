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
from fedstack.crypto.signing import PUBLIC_KEY_BYTES, SIGNATURE_BYTES

from .errors import ProtocolViolation
from .messages import (
    COMMIT_BYTES,
    NONCE_BYTES,
    SEED_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    Advert,
    ConsistencyReply,
    ConsistencyRequest,
    MaskRequest,
    RevealReply,
    RevealRequest,
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
SIGNED_ADVERT_BYTES = KEY_ENTRY_BYTES + COMMIT_BYTES + PUBLIC_KEY_BYTES + SIGNATURE_BYTES
REVEAL_ENTRY_BYTES = NONCE_BYTES + SIGNATURE_BYTES

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
# security=malicious
REVEAL_REQ = "rreq.round"
CONSISTENCY_REQ = "creq.round"
REVEAL_REP = "rrep.round"
CONSISTENCY_REP = "crep.round"
CONSORTIUM = "consortium"  # simulation only: the run's proposed consortium directory


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
    out: Wire = {ADVERT: adv.round_num, "adv.enc_pk": adv.enc_pk, "adv.mask_pk": adv.mask_pk}
    if adv.signed:
        out.update({"adv.commit": adv.commit, "adv.signer": adv.signer, "adv.sig": adv.signature})
    return out


def decode_advert(wire: Mapping, node: int) -> Advert:
    signed = "adv.signer" in wire
    adv = Advert(
        node,
        get_round(wire, ADVERT),
        check_bytes(wire.get("adv.enc_pk"), KEY_BYTES, "adv.enc_pk"),
        check_bytes(wire.get("adv.mask_pk"), KEY_BYTES, "adv.mask_pk"),
        check_bytes(wire.get("adv.commit"), COMMIT_BYTES, "adv.commit") if signed else b"",
        check_bytes(wire.get("adv.signer"), PUBLIC_KEY_BYTES, "adv.signer") if signed else b"",
        check_bytes(wire.get("adv.sig"), SIGNATURE_BYTES, "adv.sig") if signed else b"",
    )
    adv.validate()
    return adv


def _pack_adverts(adverts: dict[int, Advert]) -> bytes:
    """Signed adverts in id order, fixed-size entries (id, keys, commitment, signer, sig)."""
    return b"".join(
        int(v).to_bytes(ID_BYTES, "little")
        + a.enc_pk + a.mask_pk + a.commit + a.signer + a.signature
        for v, a in sorted(adverts.items())
    )


def _unpack_adverts(data: object, round_num: int, what: str) -> dict[int, Advert]:
    if not isinstance(data, bytes) or len(data) % SIGNED_ADVERT_BYTES:
        raise ProtocolViolation(f"{what} must be a multiple of {SIGNED_ADVERT_BYTES} bytes")
    out: dict[int, Advert] = {}
    for e in _chunks(data, SIGNED_ADVERT_BYTES, len(data) // SIGNED_ADVERT_BYTES, what):
        node = int.from_bytes(e[:ID_BYTES], "little")
        if node in out:
            raise ProtocolViolation(f"{what} lists a node twice")
        at = [ID_BYTES, KEY_BYTES, KEY_BYTES, COMMIT_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES]
        offsets = np.cumsum(at).tolist()
        parts = [e[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        out[node] = Advert(node, round_num, *parts)
    return out


# -- malicious: graph-seed reveal ----------------------------------------------------------
def encode_reveal_request(req: RevealRequest) -> Wire:
    return {
        REVEAL_REQ: req.round_num,
        "rreq.participants": ids_to_bytes(req.participants),
        "rreq.adverts": _pack_adverts(req.adverts),
    }


def decode_reveal_request(wire: Mapping) -> RevealRequest:
    round_num = get_round(wire, REVEAL_REQ)
    return RevealRequest(
        round_num,
        ids_from_bytes(wire.get("rreq.participants"), "rreq.participants"),
        _unpack_adverts(wire.get("rreq.adverts"), round_num, "rreq.adverts"),
    )


def encode_reveal_reply(rep: RevealReply) -> Wire:
    return {REVEAL_REP: rep.round_num, "rrep.nonce": rep.nonce, "rrep.sig": rep.signature}


def decode_reveal_reply(wire: Mapping, node: int) -> RevealReply:
    return RevealReply(
        node,
        get_round(wire, REVEAL_REP),
        check_bytes(wire.get("rrep.nonce"), NONCE_BYTES, "rrep.nonce"),
        check_bytes(wire.get("rrep.sig"), SIGNATURE_BYTES, "rrep.sig"),
    )


# -- malicious: consistency check ----------------------------------------------------------
def encode_consistency_request(req: ConsistencyRequest) -> Wire:
    return {
        CONSISTENCY_REQ: req.round_num,
        "creq.shared": ids_to_bytes(req.shared),
        "creq.survivors": ids_to_bytes(req.survivors),
    }


def decode_consistency_request(wire: Mapping) -> ConsistencyRequest:
    return ConsistencyRequest(
        get_round(wire, CONSISTENCY_REQ),
        ids_from_bytes(wire.get("creq.shared"), "creq.shared"),
        ids_from_bytes(wire.get("creq.survivors"), "creq.survivors"),
    )


def encode_consistency_reply(rep: ConsistencyReply) -> Wire:
    return {CONSISTENCY_REP: rep.round_num, "crep.sig": rep.signature}


def decode_consistency_reply(wire: Mapping, node: int) -> ConsistencyReply:
    return ConsistencyReply(
        node,
        get_round(wire, CONSISTENCY_REP),
        check_bytes(wire.get("crep.sig"), SIGNATURE_BYTES, "crep.sig"),
    )


# -- share stage -------------------------------------------------------------------------
def encode_share_request(req: ShareRequest) -> Wire:
    keys = b"".join(
        int(v).to_bytes(ID_BYTES, "little") + enc + mask
        for v, (enc, mask) in sorted(req.keys.items())
    )
    out: Wire = {
        SHARE_REQ: req.round_num,
        "sreq.seed": req.seed,
        "sreq.participants": ids_to_bytes(req.participants),
        "sreq.keys": keys,
    }
    if req.adverts:
        out["sreq.adverts"] = _pack_adverts(req.adverts)
    if req.reveals:
        out["sreq.reveal_ids"] = ids_to_bytes(sorted(req.reveals))
        out["sreq.reveals"] = b"".join(n + s for _, (n, s) in sorted(req.reveals.items()))
    return out


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
    round_num = get_round(wire, SHARE_REQ)
    adverts = (
        _unpack_adverts(wire["sreq.adverts"], round_num, "sreq.adverts")
        if "sreq.adverts" in wire
        else {}
    )
    reveals: dict[int, tuple[bytes, bytes]] = {}
    if "sreq.reveal_ids" in wire:
        owners = ids_from_bytes(wire.get("sreq.reveal_ids"), "sreq.reveal_ids")
        entries = _chunks(wire.get("sreq.reveals"), REVEAL_ENTRY_BYTES, len(owners), "sreq.reveals")
        reveals = {
            v: (e[:NONCE_BYTES], e[NONCE_BYTES:]) for v, e in zip(owners, entries, strict=True)
        }
    return ShareRequest(
        round_num,
        check_bytes(wire.get("sreq.seed"), SEED_BYTES, "sreq.seed"),
        ids_from_bytes(wire.get("sreq.participants"), "sreq.participants"),
        keys,
        adverts,
        reveals,
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
    out: Wire = {
        UNMASK_REQ: req.round_num,
        "ureq.self": ids_to_bytes(req.reveal_self),
        "ureq.key": ids_to_bytes(req.reveal_key),
    }
    if req.signatures:
        signers = sorted(req.signatures)
        out["ureq.signers"] = ids_to_bytes(signers)
        out["ureq.sigs"] = b"".join(req.signatures[v] for v in signers)
    return out


def decode_unmask_request(wire: Mapping) -> UnmaskRequest:
    signatures: dict[int, bytes] = {}
    if "ureq.signers" in wire:
        signers = ids_from_bytes(wire.get("ureq.signers"), "ureq.signers")
        sigs = _chunks(wire.get("ureq.sigs"), SIGNATURE_BYTES, len(signers), "ureq.sigs")
        signatures = dict(zip(signers, sigs, strict=True))
    return UnmaskRequest(
        get_round(wire, UNMASK_REQ),
        ids_from_bytes(wire.get("ureq.self"), "ureq.self"),
        ids_from_bytes(wire.get("ureq.key"), "ureq.key"),
        signatures,
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
