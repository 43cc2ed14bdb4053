"""Protocol core with simulated parties: exact survivor sums under dropouts, aborts, pipelining."""

import tracemalloc

import numpy as np
import pytest

from fedstack.crypto.quantise import FixedPointCodec, auto_scale
from fedstack.strategies.secagg.client import ClientState, SecAggClient
from fedstack.strategies.secagg.errors import SecAggAbort
from fedstack.strategies.secagg.messages import STAGES
from fedstack.strategies.secagg.params import ProtocolParams
from fedstack.strategies.secagg.server import ServerRound
from fedstack.strategies.secagg.simulate import SERVER, Meter, SimulatedFederation

CLIP, MAX_CLIENTS, MAX_WEIGHT = 3.0, 64, 1000
CODEC = FixedPointCodec(
    32, CLIP, auto_scale(32, CLIP, MAX_CLIENTS, MAX_WEIGHT), MAX_CLIENTS, MAX_WEIGHT
)
D = 40


def _inputs(nodes, seed=0, d=D):
    rng = np.random.default_rng(seed)
    return {u: (rng.normal(size=d), int(rng.integers(1, MAX_WEIGHT))) for u in nodes}


def _exact_sum(inputs, members):
    """The plaintext ring sum the protocol must reproduce exactly (d = D)."""
    total = np.zeros(D + 1, dtype=CODEC.dtype)
    for u in members:
        total += CODEC.encode(*inputs[u])
    return CODEC.decode(total)


@pytest.mark.parametrize("graph", ["complete", "sparse"])
def test_aggregate_equals_weighted_mean_within_bound(graph):
    params = ProtocolParams(
        CODEC, graph=graph, neighbours=6 if graph == "sparse" else None, threshold=0.6
    )
    nodes = [3, 11, 17, 29, 40, 41, 58, 60, 77, 90, 91, 99]
    fed = SimulatedFederation(params, nodes)
    inputs = _inputs(nodes)
    weighted, weight, server = fed.run_round(1, inputs)
    ref = sum(w * np.clip(x, -CLIP, CLIP) for x, w in inputs.values()) / sum(
        w for _, w in inputs.values()
    )
    assert weight == sum(w for _, w in inputs.values())
    assert np.abs(weighted / weight - ref).max() <= CODEC.error_bound
    if graph == "sparse":
        assert all(len(v) == 6 for v in server.nbrs.values())
    assert not fed.refusals


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_at_every_stage_up_to_n_minus_t(stage):
    n, t = 8, 5
    params = ProtocolParams(CODEC, threshold=t)
    nodes = list(range(100, 100 + n))
    inputs = _inputs(nodes, seed=1)
    for drops in range(0, n - t + 2):
        fed = SimulatedFederation(params, nodes)
        dropped = set(nodes[1 : 1 + drops])  # spread over low and high ids: both mask signs
        if drops > n - t:
            with pytest.raises(SecAggAbort, match="aborted"):
                fed.run_round(1, inputs, drop={stage: dropped})
            continue
        weighted, weight, _ = fed.run_round(1, inputs, drop={stage: dropped})
        # unmask-stage dropouts still contributed their masked input
        members = nodes if stage == "unmask" else [u for u in nodes if u not in dropped]
        ref_w, ref_n = _exact_sum(inputs, members)
        assert weight == ref_n
        assert np.array_equal(weighted, ref_w)


def test_sparse_graph_dropouts_give_exact_sum_or_clean_abort():
    params = ProtocolParams(CODEC, graph="sparse", neighbours=6, threshold=0.6)  # t = 5 of 7
    nodes = list(range(1, 21))
    inputs = _inputs(nodes, seed=2)
    rng = np.random.default_rng(5)
    outcomes = set()
    for trial in range(8):
        drop = {
            s: set(rng.choice(nodes, size=int(rng.integers(0, 3)), replace=False).tolist())
            for s in STAGES
        }
        fed = SimulatedFederation(params, nodes)
        try:
            weighted, weight, server = fed.run_round(trial + 1, inputs, drop=drop)
        except SecAggAbort:
            outcomes.add("abort")
            continue
        outcomes.add("ok")
        ref_w, ref_n = _exact_sum(inputs, server.survivors)
        assert weight == ref_n and np.array_equal(weighted, ref_w)
    assert "ok" in outcomes


def test_pipelined_rounds_and_serialised_state():
    """Keys for round r+1 are advertised during round r (before its unmask) and both complete."""
    params = ProtocolParams(CODEC, threshold=0.6)
    nodes = [5, 6, 7, 8, 9]
    fed = SimulatedFederation(params, nodes)
    adverts = fed.advertise(1, nodes)
    for r in (1, 2, 3):
        inputs = _inputs(nodes, seed=r)
        # advertise r+1 while round r's record is still open (as the masked-input reply does)
        weighted, weight, _ = fed.run_round(r, inputs, adverts=adverts)
        next_adverts = fed.advertise(r + 1, nodes)
        ref_w, ref_n = _exact_sum(inputs, nodes)
        assert weight == ref_n and np.array_equal(weighted, ref_w)
        assert all(next_adverts[u].mask_pk != adverts[u].mask_pk for u in nodes)
        adverts = next_adverts
    state = ClientState.from_bytes(fed.states[5])
    assert list(state.rounds) == ["4"] and state.closed_through == 3
    assert ClientState.from_bytes(state.to_bytes()) == state


def test_abort_below_threshold_at_start():
    params = ProtocolParams(CODEC, threshold=4)
    fed = SimulatedFederation(params, [1, 2, 3])
    with pytest.raises(SecAggAbort, match="3 participants"):
        fed.run_round(1, _inputs([1, 2, 3]))


def test_client_never_reuses_keys_across_rounds_or_after_sharing():
    params = ProtocolParams(CODEC, threshold=0.6)
    fed = SimulatedFederation(params, [1, 2, 3])
    first = fed.advertise(2, [1, 2, 3])
    # asked again before sharing (lost reply): the same public keys, nothing new generated
    assert fed.advertise(2, [1, 2, 3]) == first
    fed.run_round(2, _inputs([1, 2, 3]), adverts=first)
    client = SecAggClient(params, ClientState.from_bytes(fed.states[1]))
    with pytest.raises(ValueError, match="already used or the round is closed"):
        client.advertise(2)  # round 2 is closed: its keys can never come back
    with pytest.raises(ValueError, match="already used or the round is closed"):
        client.advertise(1)
    assert client.advertise(3).mask_pk != first[1].mask_pk


def test_streaming_round_is_exact_and_meters_each_party():
    """Inputs made on demand, masked inputs summed as they arrive: the exact survivor sum
    under a sparse graph with dropouts after sharing; the server holds O(d), not n * d."""
    params = ProtocolParams(CODEC, graph="sparse", neighbours=6, threshold=0.6)
    nodes = list(range(1, 41))
    d = 50_000
    inputs = _inputs(nodes, seed=3, d=d)
    dropped = {4, 17, 33}
    made: list[int] = []

    def make_input(u):
        made.append(u)
        return inputs[u]

    fed = SimulatedFederation(params, nodes)
    meter = Meter(trace_memory=True)
    try:
        weighted, weight, server = fed.run_round_streaming(
            1, nodes, make_input, d, drop={"masked-input": dropped}, meter=meter
        )
    finally:
        tracemalloc.stop()
    assert sorted(made) == server.survivors and server.dropped == sorted(dropped)
    total = np.zeros(d + 1, dtype=CODEC.dtype)
    for u in made:
        total += CODEC.encode(*inputs[u])
    ref_w, ref_n = CODEC.decode(total)
    assert weight == ref_n and np.array_equal(weighted, ref_w)
    # each survivor metered over its 4 stages, each dropout over advertise + share
    assert {meter.parties[u].calls for u in made} == {4}
    assert {meter.parties[u].calls for u in dropped} == {2}
    srv = meter.parties[SERVER]
    assert srv.wall_s > 0 and srv.cpu_s > 0
    vector = (d + 1) * CODEC.dtype.itemsize
    # holding every masked input would be 37 vectors; the running sum plus PRG blocks is ~2
    assert vector <= srv.peak_bytes < 4 * vector
    assert all(meter.parties[u].peak_bytes >= vector for u in made)  # its own masked vector


def test_client_state_after_masking_grows_with_k_not_n():
    """Between masking and unmasking a client keeps U1 ∩ its neighbourhood, not all of U1."""
    params = ProtocolParams(CODEC, graph="sparse", neighbours=4, threshold=0.6)
    nodes = list(range(1, 61))
    fed = SimulatedFederation(params, nodes)
    server = ServerRound(1, params, D + 1, fed.advertise(1, nodes))
    reqs = server.share_requests()
    mreqs = server.receive_shares({u: fed.call(u, lambda c, r=reqs[u]: c.share(r)) for u in nodes})
    fed.call(1, lambda c: c.mask(mreqs[1], np.zeros(D), 1))
    rec = ClientState.from_bytes(fed.states[1]).rounds["1"]
    assert rec.shared == sorted([*server.nbrs[1], 1])
