"""dp=distributed through the real secure-aggregation core (simulated parties, one process).

The clients run the real :class:`SecAggClient` (keys, Shamir shares, masks) with the
DistributedCodec as their input codec; the server runs the real :class:`ServerRound`. The
harness gives the codec a zero global model, so a client's values ARE its delta, and keeps
the unmasked ring sum the server decodes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedstack.privacy.distributed import codec as codec_module
from fedstack.privacy.distributed.codec import DistributedCodec, signed_words
from fedstack.privacy.distributed.guard import guard_unmasking
from fedstack.privacy.distributed.mechanism import MechanismSettings
from fedstack.privacy.distributed.rounding import DEFAULT_BETA
from fedstack.privacy.distributed.server_context import round_context
from fedstack.strategies.secagg.errors import InputOutOfBounds, SecAggAbort
from fedstack.strategies.secagg.input_codec import CodecContext
from fedstack.strategies.secagg.messages import STAGE_MASKED
from fedstack.strategies.secagg.params import ProtocolParams
from fedstack.strategies.secagg.server import ServerRound
from fedstack.strategies.secagg.simulate import SimulatedFederation

BITS, MAX_CLIENTS, D = 32, 20, 500  # d' = 512
NODES = [5, 9, 14, 22, 31]


def _mechanism(**changes) -> MechanismSettings:
    base = MechanismSettings(
        clip=1.0, noise_multiplier=1.0, target_epsilon=None, delta=1e-5, rounds=10,
        dropout_slack=0.2, rounding_beta=DEFAULT_BETA, wrap_probability=1e-9, scale=2.0**8,
        bits=BITS, max_clients=MAX_CLIENTS,
    )
    return dataclasses.replace(base, **changes)


@dataclasses.dataclass
class ZeroGlobal:
    """The codec with a zero global model (values = delta); keeps the last unmasked sum."""

    inner: DistributedCodec
    d: int = D
    contexts: list[CodecContext] = dataclasses.field(default_factory=list)
    encoded: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    last_total: np.ndarray | None = None

    bits = property(lambda self: self.inner.bits)
    max_clients = property(lambda self: self.inner.max_clients)
    dtype = property(lambda self: self.inner.dtype)

    def words(self, d: int) -> int:
        return self.inner.words(d)

    def check_survivors(self, survivors: int, expected: int) -> None:
        self.inner.check_survivors(survivors, expected)

    def check_bounds(self, ring_sum: np.ndarray, survivors: int) -> None:
        self.inner.check_bounds(ring_sum, survivors)

    def encode(self, values, weight, context: CodecContext) -> np.ndarray:
        ctx = dataclasses.replace(context, global_values=np.zeros(self.d))
        self.contexts.append(ctx)
        words = self.inner.encode(values, weight, ctx)
        self.encoded[len(self.contexts)] = words.copy()
        return words

    def decode(self, ring_sum, survivors=None, context=None):
        self.last_total = np.array(ring_sum, copy=True)
        signed = signed_words(ring_sum, self.bits)
        return signed[:-1].astype(np.float64), int(signed[-1])


def _federation(harness: ZeroGlobal) -> SimulatedFederation:
    # The harness is both the ring (``codec``) and the input codec, so that whichever
    # decode the simulation calls, the unmasked sum is kept.
    params = ProtocolParams(harness, input_codec=harness)  # type: ignore[arg-type]
    return SimulatedFederation(params, list(NODES))


def test_noise_on_the_unmasked_sum_has_the_calibrated_variance():
    """Zero updates: the unmasked sum is the noise alone. 5 planned, slack 0.2 -> n_min 4:
    each client adds mu/4, so 5 survivors carry 5mu/4 and 4 survivors exactly mu."""
    harness = ZeroGlobal(DistributedCodec(_mechanism()))
    fed = _federation(harness)
    plan = harness.inner.plan(D)
    mu = plan.variance
    samples: dict[int, list[np.ndarray]] = {5: [], 4: []}
    for r in range(1, 25):
        drop = {STAGE_MASKED: {NODES[r % 5]}} if r % 2 else None
        fed.run_round(r, {u: (np.zeros(D), 1) for u in NODES}, drop=drop)
        signed = signed_words(harness.last_total, BITS)
        survivors = int(signed[-1])
        samples[survivors].append(signed[:-1].astype(np.float64))
    assert not fed.refusals
    for survivors, expected in [(5, 5 * mu / 4), (4, mu)]:
        noise = np.concatenate(samples[survivors])
        n = noise.size  # 12 rounds x 512 coordinates
        assert abs(noise.mean()) < 5 * math.sqrt(expected / n)
        assert abs(noise.var() / expected - 1) < 5 * math.sqrt(2 / n), survivors
    # The floor the accountant uses is what min_survivors noise shares add up to.
    assert plan.min_survivors(5) * plan.client_variance(5) == pytest.approx(mu)


def test_dropouts_beyond_the_slack_abort_before_unmasking(monkeypatch):
    codec = DistributedCodec(_mechanism())
    codec.check_survivors(4, 5)  # within the slack
    with pytest.raises(InputOutOfBounds, match=r"dp\.dropout_slack"):
        codec.check_survivors(3, 5)
    # The server's guard (what DistributedDPSecAgg installs on every round) on every
    # ServerRound of the simulated federation.
    real_init = ServerRound.__post_init__

    def guarded_init(self):
        real_init(self)
        guard_unmasking(self, codec)

    monkeypatch.setattr(ServerRound, "__post_init__", guarded_init)
    harness = ZeroGlobal(codec)
    fed = _federation(harness)
    fed.run_round(1, {u: (np.zeros(D), 1) for u in NODES}, drop={STAGE_MASKED: {NODES[0]}})
    assert harness.last_total is not None  # one dropout: within the slack, unmasked
    harness.last_total = None
    with pytest.raises(SecAggAbort, match="dropout_slack"):
        fed.run_round(2, {u: (np.zeros(D), 1) for u in NODES}, drop={STAGE_MASKED: set(NODES[:2])})
    assert harness.last_total is None  # nothing was unmasked


def test_no_client_update_leaves_without_its_noise(monkeypatch):
    """Spy on the noise each client draws and on what the server receives: every input the
    server gets is masked, and under the masks lies rounded(delta) + a full noise share."""
    drawn: list[np.ndarray] = []
    real_skellam = codec_module.skellam

    def spy(variance, n, rng):
        out = real_skellam(variance, n, rng)
        drawn.append(out.copy())
        return out

    monkeypatch.setattr(codec_module, "skellam", spy)
    received: dict[int, np.ndarray] = {}
    real_add = ServerRound.add_masked

    def add(self, node, rep):
        received[node] = rep.words.copy()
        return real_add(self, node, rep)

    monkeypatch.setattr(ServerRound, "add_masked", add)
    harness = ZeroGlobal(DistributedCodec(_mechanism(noise_multiplier=0.5)))
    fed = _federation(harness)
    rng = np.random.default_rng(4)
    inputs = {u: (rng.normal(size=D) * 0.3, 1) for u in NODES}
    fed.run_round(1, inputs)
    plan = harness.inner.plan(D)
    share = plan.client_variance(len(NODES))
    assert len(drawn) == len(harness.encoded) == len(received) == len(NODES)
    for i, noise in enumerate(drawn):
        encoded = signed_words(harness.encoded[i + 1], BITS)
        rounded = encoded[:-1] - noise
        assert np.linalg.norm(rounded) <= plan.l2_sensitivity
        assert abs(noise.var() / share - 1) < 0.5  # a full share, not a token one
    # Every client's rounded update is what its own delta gives (so noise was added to IT).
    for u, (values, _) in inputs.items():
        ctx = harness.contexts[0]
        rot = codec_module.RandomizedHadamard(D, ctx.seed, ctx.round_num)
        clean = rot.forward(values * min(1.0, 1.0 / np.linalg.norm(values))) * plan.scale
        matches = [np.abs(signed_words(w, BITS)[:-1] - n - clean).max() < 1
                   for w, n in zip(harness.encoded.values(), drawn, strict=True)]
        assert sum(matches) == 1, u
    # What the server received is masked: it is not the encoded vector of anyone.
    for words in received.values():
        assert not any(np.array_equal(words, e) for e in harness.encoded.values())


@pytest.mark.parametrize("security", ["semi-honest", "malicious"])
def test_server_context_rotates_back_with_the_clients_seed(security):
    """The strategy decodes with round_context(srv): its seed must be the one every client
    rotated with (agreed seed if malicious, else H(run, round)), and the decoded mean must
    then be the clients' mean delta."""
    from fedstack.consortium import Identity, Member, Roster
    from fedstack.crypto import signing
    from fedstack.policy import NodePolicy
    from fedstack.strategies.secagg.client import ClientTrust

    harness = ZeroGlobal(DistributedCodec(_mechanism(noise_multiplier=1e-3, scale=0.0)))
    params = ProtocolParams(harness, input_codec=harness, security=security)  # type: ignore[arg-type]
    ids = {u: Identity(f"m{u}", signing.generate()) for u in NODES}
    roster = Roster([Member(i.name, i.public) for i in ids.values()])
    fed = SimulatedFederation(params, list(NODES), run_id=7, trusts={
        u: ClientTrust(7, ids[u], roster, NodePolicy(min_cohort=2)) for u in NODES})
    rng = np.random.default_rng(5)
    inputs = {u: (rng.normal(size=D) * 0.01, 1) for u in NODES}
    _, _, srv = fed.run_round(3, inputs)
    ctx = round_context(srv, params.malicious, 7, np.zeros(D))
    assert {c.seed for c in harness.contexts} == {ctx.seed}
    assert ctx.expected_survivors == len(NODES) and ctx.round_num == 3
    mean, count = harness.inner.decode(harness.last_total, len(NODES), ctx)
    assert count == len(NODES)
    target = np.mean([x for x, _ in inputs.values()], axis=0)
    assert np.abs(mean - target).max() < 2e-3  # noise std 2e-4 per coordinate of the mean
    # Another seed un-rotates with the wrong signs: the result is nowhere near the mean.
    wrong = dataclasses.replace(ctx, seed=bytes(32))
    assert np.abs(harness.inner.decode(harness.last_total, len(NODES), wrong)[0] - target).max(
    ) > 1e-2
