"""Security properties of the protocol core a reviewer would ask for."""

import base64
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import chisquare

from fedstack.crypto.keys import derive_key, pair_key
from fedstack.crypto.prg import expand
from fedstack.crypto.quantise import FixedPointCodec, auto_scale
from fedstack.strategies.secagg.client import PURPOSE_MASK, ClientState, SecAggClient
from fedstack.strategies.secagg.errors import ProtocolViolation, SecAggAbort
from fedstack.strategies.secagg.messages import UnmaskRequest
from fedstack.strategies.secagg.params import ProtocolParams
from fedstack.strategies.secagg.server import ServerRound
from fedstack.strategies.secagg.simulate import SimulatedFederation

CODEC = FixedPointCodec(32, 2.0, auto_scale(32, 2.0, 16, 100), 16, 100)
PARAMS = ProtocolParams(CODEC, threshold=0.6)
NODES = [10, 20, 30, 40, 50]
D = 4096


class Round:
    """Drive one round stage by stage, keeping the messages for inspection."""

    def __init__(self, round_num=1, nodes=NODES, params=PARAMS, fed=None):
        self.fed = fed or SimulatedFederation(params, nodes)
        self.r = round_num
        self.server = ServerRound(round_num, params, D + 1, self.fed.advertise(round_num, nodes))
        reqs = self.server.share_requests()
        self.share_replies = {u: self.fed.call(u, lambda c, q=reqs[u]: c.share(q)) for u in nodes}

    def client(self, u):
        return SecAggClient(self.fed.params, ClientState.from_bytes(self.fed.states[u]))


def _uniform_high_bits(words: np.ndarray) -> float:
    return chisquare(np.bincount((words >> np.uint32(24)).astype(np.int64), minlength=256)).pvalue


def test_single_masked_vector_is_uniform():
    rnd = Round()
    mreqs = rnd.server.receive_shares(rnd.share_replies)
    x = np.full(D, 0.25)  # a constant, highly non-uniform input
    masked = rnd.fed.call(10, lambda c: c.mask(mreqs[10], x, 7))
    assert _uniform_high_bits(masked.words) > 1e-6
    assert _uniform_high_bits(CODEC.encode(x, 7)) < 1e-6  # the test detects the plain encoding


def test_masks_differ_across_clients_and_rounds():
    fed = SimulatedFederation(PARAMS, NODES)
    x = np.zeros(D)
    seen = []
    for r in (1, 2):
        rnd = Round(r, fed=fed)
        mreqs = rnd.server.receive_shares(rnd.share_replies)
        for u in NODES[:2]:
            seen.append(fed.call(u, lambda c, q=mreqs[u]: c.mask(q, x, 1)).words)
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert np.mean(seen[i] == seen[j]) < 0.01


def test_late_masked_input_is_rejected_and_stays_private():
    rnd = Round()
    mreqs = rnd.server.receive_shares(rnd.share_replies)
    x = {u: np.random.default_rng(u).normal(size=D) for u in NODES}
    masked = {u: rnd.fed.call(u, lambda c, q=mreqs[u], v=x[u]: c.mask(q, v, 3)) for u in NODES}
    late = 50
    ureqs = rnd.server.receive_masked({u: m for u, m in masked.items() if u != late})
    assert rnd.server.dropped == [late]
    with pytest.raises(ProtocolViolation, match="not accepted"):
        rnd.server.receive_masked({late: masked[late]})
    replies = {u: rnd.fed.call(u, lambda c, q=ureqs[u]: c.unmask(q)) for u in ureqs}
    assert all(late in rep.key_shares and late not in rep.self_shares for rep in replies.values())
    total = rnd.server.receive_unmask(replies)
    _, weight = CODEC.decode(total)
    ref = sum(CODEC.encode(x[u], 3).astype(np.int64) for u in NODES if u != late)
    assert weight == 12
    assert np.array_equal(total, ref.astype(np.uint32))
    # The server now knows the late party's mask key; stripping its pairwise masks from the
    # late vector still leaves the self mask: the result looks uniform, not like x[late].
    sk = base64.b64decode(ClientState.from_bytes(rnd.fed.states[late]).rounds["1"].mask_sk)
    stripped = masked[late].words.copy()
    for v in NODES[:-1]:
        stream = expand(
            pair_key(sk, rnd.server.adverts[v].mask_pk, PURPOSE_MASK, 1, late, v),
            D + 1,
            np.uint32,
            "aes",
        )
        stripped += stream  # late = 50 is the largest id: it subtracted every pairwise stream
    assert not np.array_equal(stripped, CODEC.encode(x[late], 3))
    assert _uniform_high_bits(stripped) > 1e-6
    # and with its self mask removed too (which needs b_u: never revealed) it would be x[late]
    seed = base64.b64decode(ClientState.from_bytes(rnd.fed.states[late]).rounds["1"].self_seed)
    stripped -= expand(derive_key(seed, "self-mask", 1, (late,)), D + 1, np.uint32, "aes")
    assert np.array_equal(stripped, CODEC.encode(x[late], 3))


def test_request_for_both_share_kinds_is_refused():
    rnd = Round()
    mreqs = rnd.server.receive_shares(rnd.share_replies)
    masked = {u: rnd.fed.call(u, lambda c, q=mreqs[u]: c.mask(q, np.zeros(D), 1)) for u in NODES}
    ureqs = rnd.server.receive_masked(masked)
    req = ureqs[10]
    evil = UnmaskRequest(1, req.reveal_self, [20])  # 20 both as survivor and as dropped
    with pytest.raises(ProtocolViolation, match="both"):
        rnd.client(10).unmask(evil)
    # a second request after an honest answer is refused too (one answer per round)
    client = rnd.client(10)
    client.unmask(req)
    with pytest.raises(ProtocolViolation, match="no open round"):
        client.unmask(UnmaskRequest(1, [10], [20, 30, 40, 50]))


def test_tampered_or_replayed_share_ciphertexts_are_rejected():
    fed = SimulatedFederation(PARAMS, NODES)
    r1 = Round(1, fed=fed)
    m1 = r1.server.receive_shares(r1.share_replies)
    r2 = Round(2, fed=fed)
    m2 = r2.server.receive_shares(r2.share_replies)
    req = m2[10]
    # bit flip
    bad = dict(req.ciphertexts)
    ct = bytearray(bad[20])
    ct[30] ^= 0x01
    bad[20] = bytes(ct)
    with pytest.raises(ProtocolViolation, match="authentication"):
        r2.client(10).mask(replace(req, ciphertexts=bad), np.zeros(D), 1)
    # replay of round 1's ciphertext from the same sender
    replay = dict(req.ciphertexts)
    replay[20] = m1[10].ciphertexts[20]
    with pytest.raises(ProtocolViolation, match="authentication"):
        r2.client(10).mask(replace(req, ciphertexts=replay), np.zeros(D), 1)
    # re-routing: 30's ciphertext presented as coming from 20
    swap = dict(req.ciphertexts)
    swap[20] = req.ciphertexts[30]
    with pytest.raises(ProtocolViolation, match="authentication"):
        r2.client(10).mask(replace(req, ciphertexts=swap), np.zeros(D), 1)
    # the honest request still works, and replaying it afterwards is refused
    client = r2.client(10)
    client.mask(req, np.zeros(D), 1)
    with pytest.raises(ProtocolViolation, match="stage"):
        client.mask(req, np.zeros(D), 1)


def test_client_refuses_wrong_keys_or_neighbourhood_in_share_request():
    fed = SimulatedFederation(PARAMS, NODES)
    server = ServerRound(1, PARAMS, D + 1, fed.advertise(1, NODES))
    req = server.share_requests()[10]
    keys = dict(req.keys)
    keys[10] = (keys[20][0], keys[10][1])  # server misstates the client's own key
    with pytest.raises(ProtocolViolation, match="own keys"):
        SecAggClient(PARAMS, ClientState.from_bytes(fed.states[10])).share(replace(req, keys=keys))
    keys = dict(req.keys)
    del keys[50]
    with pytest.raises(ProtocolViolation, match="wrong"):
        SecAggClient(PARAMS, ClientState.from_bytes(fed.states[10])).share(replace(req, keys=keys))


def test_server_rejects_malformed_replies_as_dropouts():
    rnd = Round(nodes=[10, 20, 30, 40, 50, 60, 70, 80])
    mreqs = rnd.server.receive_shares(rnd.share_replies)
    masked = {u: rnd.fed.call(u, lambda c, q=mreqs[u]: c.mask(q, np.zeros(D), 1)) for u in mreqs}
    masked[20] = replace(masked[20], words=masked[20].words.astype(np.uint64))
    masked[30] = replace(masked[30], words=masked[30].words[:-1])
    masked[40] = replace(masked[40], round_num=7)
    rnd.server.receive_masked(masked)
    assert set(rnd.server.rejected) == {20, 30, 40} and rnd.server.survivors == [10, 50, 60, 70, 80]
    assert "uint32" in rnd.server.rejected[20] and "round 7" in rnd.server.rejected[40]


def test_copied_public_key_excludes_its_holders_not_the_round():
    fed = SimulatedFederation(PARAMS, NODES)
    adverts = fed.advertise(1, NODES)
    adverts[50] = replace(adverts[50], mask_pk=adverts[40].mask_pk)  # 50 copies 40's key
    server = ServerRound(1, PARAMS, D + 1, adverts)
    assert server.participants == [10, 20, 30] and set(server.rejected) == {40, 50}


def test_more_participants_than_the_no_wrap_bound_are_refused():
    small = ProtocolParams(FixedPointCodec(32, 2.0, 1024.0, 4, 100), threshold=0.6)
    fed = SimulatedFederation(small, NODES)
    with pytest.raises(SecAggAbort, match="max_clients"):
        ServerRound(1, small, D + 1, fed.advertise(1, NODES))
    honest = ServerRound(1, PARAMS, D + 1, fed.advertise(1, NODES))
    client = SecAggClient(small, ClientState.from_bytes(fed.states[10]))
    with pytest.raises(ProtocolViolation, match="max_clients"):
        client.share(honest.share_requests()[10])


def test_masked_inputs_one_at_a_time_duplicates_and_late_ones_rejected():
    rnd = Round()
    mreqs = rnd.server.receive_shares(rnd.share_replies)
    masked = {u: rnd.fed.call(u, lambda c, q=mreqs[u]: c.mask(q, np.zeros(D), 1)) for u in NODES}
    assert rnd.server.add_masked(10, masked[10])
    assert not rnd.server.add_masked(10, masked[10])  # added twice would corrupt the sum
    assert "second masked input" in rnd.server.rejected[10]
    for u in NODES[1:4]:
        assert rnd.server.add_masked(u, masked[u])
    ureqs = rnd.server.close_masked()
    assert sorted(ureqs) == rnd.server.survivors == NODES[:4] and rnd.server.dropped == [50]
    with pytest.raises(ProtocolViolation, match="late or replayed"):
        rnd.server.add_masked(50, masked[50])


def test_unmask_reply_with_a_share_outside_the_field_is_rejected():
    rnd = Round()
    mreqs = rnd.server.receive_shares(rnd.share_replies)
    masked = {u: rnd.fed.call(u, lambda c, q=mreqs[u]: c.mask(q, np.zeros(D), 1)) for u in NODES}
    ureqs = rnd.server.receive_masked(masked)
    replies = {u: rnd.fed.call(u, lambda c, q=ureqs[u]: c.unmask(q)) for u in NODES}
    bad = dict(replies[20].self_shares)
    bad[30] = np.full_like(bad[30], 2**32 - 1)  # >= the Shamir prime
    replies[20] = replace(replies[20], self_shares=bad)
    total = rnd.server.receive_unmask(replies)  # 4 honest replies >= t = 3: still exact
    assert "self-mask share of 30" in rnd.server.rejected[20]
    assert np.array_equal(total, np.zeros(D + 1, np.uint32) + CODEC.encode(np.zeros(D), 5))
