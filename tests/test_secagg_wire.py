"""Flat wire encoding of protocol messages: exact round trips and validated decoding."""

import os

import numpy as np
import pytest

from fedstack.crypto.shamir import NUM_LIMBS
from fedstack.strategies.secagg import wire
from fedstack.strategies.secagg.errors import ProtocolViolation
from fedstack.strategies.secagg.messages import (
    SHARE_CIPHERTEXT_BYTES,
    Advert,
    MaskRequest,
    ShareReply,
    ShareRequest,
    UnmaskReply,
    UnmaskRequest,
)

BIG = 2**64 - 1  # node ids are uint64: above ConfigRecord's signed int range


def _ct() -> bytes:
    return os.urandom(SHARE_CIPHERTEXT_BYTES)


def test_round_trips():
    adv = Advert(BIG, 3, os.urandom(32), os.urandom(32))
    assert wire.decode_advert(wire.encode_advert(adv), BIG) == adv
    sreq = ShareRequest(
        3,
        os.urandom(32),
        [1, 7, BIG],
        {1: (os.urandom(32), os.urandom(32)), BIG: (os.urandom(32), os.urandom(32))},
    )
    assert wire.decode_share_request(wire.encode_share_request(sreq)) == sreq
    srep = ShareReply(7, 3, {1: _ct(), BIG: _ct()})
    assert wire.decode_share_reply(wire.encode_share_reply(srep), 7) == srep
    mreq = MaskRequest(3, [1, 7, BIG], {1: _ct(), BIG: _ct()})
    assert wire.decode_mask_request(wire.encode_mask_request(mreq)) == mreq
    ureq = UnmaskRequest(3, [1, 7], [BIG])
    assert wire.decode_unmask_request(wire.encode_unmask_request(ureq)) == ureq
    share = np.arange(NUM_LIMBS, dtype=np.uint32)
    urep = UnmaskReply(7, 3, {1: share, 7: share + 1}, {BIG: share + 2})
    back = wire.decode_unmask_reply(wire.encode_unmask_reply(urep), 7)
    assert back.self_shares.keys() == urep.self_shares.keys()
    assert all(np.array_equal(back.key_shares[k], v) for k, v in urep.key_shares.items())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w.update({"srep.cts": w["srep.cts"][:-1]}),  # truncated ciphertexts
        lambda w: w.update(
            {"srep.receivers": w["srep.receivers"] * 2}
        ),  # count mismatch / duplicate
        lambda w: w.update({wire.SHARE_REP: -1}),  # negative round
        lambda w: w.update({wire.SHARE_REP: True}),  # bool is not a round
        lambda w: w.pop("srep.cts"),
    ],
)
def test_malformed_share_replies_are_rejected(mutate):
    w = wire.encode_share_reply(ShareReply(7, 3, {1: _ct(), 2: _ct()}))
    mutate(w)
    with pytest.raises(ProtocolViolation):
        wire.decode_share_reply(w, 7)


def test_out_of_field_shares_and_bad_keys_are_rejected():
    share = np.full(NUM_LIMBS, 2**32 - 1, dtype=np.uint32)  # >= the Shamir prime
    w = wire.encode_unmask_reply(UnmaskReply(7, 3, {7: share}, {}))
    with pytest.raises(ProtocolViolation, match="outside the Shamir field"):
        wire.decode_unmask_reply(w, 7)
    w = wire.encode_advert(Advert(7, 3, os.urandom(32), os.urandom(32)))
    w["adv.mask_pk"] = w["adv.enc_pk"]
    with pytest.raises(ProtocolViolation, match="reuses"):
        wire.decode_advert(w, 7)
    w = wire.encode_share_request(ShareRequest(3, os.urandom(32), [1], {1: (b"a" * 32, b"b" * 32)}))
    w["sreq.keys"] += w["sreq.keys"]
    with pytest.raises(ProtocolViolation, match="twice"):
        wire.decode_share_request(w)


def test_signed_messages_round_trip_and_malformed_ones_are_rejected():
    """security=malicious parts: signed adverts, reveals, views and view signatures."""
    from fedstack.strategies.secagg.messages import (
        ConsistencyReply,
        ConsistencyRequest,
        RevealReply,
        RevealRequest,
        UnmaskRequest,
    )

    adv = {v: Advert(v, 3, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(32),
                     os.urandom(64)) for v in (4, 9)}
    assert wire.decode_advert(wire.encode_advert(adv[4]), 4) == adv[4]
    req = RevealRequest(3, [4, 9], adv)
    assert wire.decode_reveal_request(wire.encode_reveal_request(req)) == req
    rep = RevealReply(4, 3, os.urandom(32), os.urandom(64))
    assert wire.decode_reveal_reply(wire.encode_reveal_reply(rep), 4) == rep
    sreq = ShareRequest(3, os.urandom(32), [4, 9], {}, adv,
                        {v: (os.urandom(32), os.urandom(64)) for v in (4, 9)})
    assert wire.decode_share_request(wire.encode_share_request(sreq)) == sreq
    creq = ConsistencyRequest(3, [4, 9], [9])
    assert wire.decode_consistency_request(wire.encode_consistency_request(creq)) == creq
    crep = ConsistencyReply(9, 3, os.urandom(64))
    assert wire.decode_consistency_reply(wire.encode_consistency_reply(crep), 9) == crep
    ureq = UnmaskRequest(3, [9], [4], {9: os.urandom(64)})
    assert wire.decode_unmask_request(wire.encode_unmask_request(ureq)) == ureq
    for broken in (
        {**wire.encode_advert(adv[4]), "adv.sig": b"x" * 63},
        {**wire.encode_advert(adv[4]), "adv.commit": b""},
    ):
        with pytest.raises(ProtocolViolation):
            wire.decode_advert(broken, 4)
    w = wire.encode_share_request(sreq)
    w["sreq.reveals"] = w["sreq.reveals"][:-1]
    with pytest.raises(ProtocolViolation):
        wire.decode_share_request(w)
    w = wire.encode_unmask_request(ureq)
    w["ureq.sigs"] += b"x"
    with pytest.raises(ProtocolViolation):
        wire.decode_unmask_request(w)
