"""A malicious server against the real secagg client mod (issue 11, attacks 1-7).

The test plays the server: it builds honest requests with the real ``ServerRound`` and then
lies -- inconsistent survivor sets, substituted or Sybil keys, a chosen graph seed, weaker
parameters, replayed, reordered and cross-round messages -- and drives the real
``secagg_mod`` (through the real ``protocol_mod`` dispatcher and the node's real policy and
consortium) with Flower Messages, as ``tests/test_secagg_security.py`` drives the core.
Every attack must end in a refusal with a fixed reason code and with no share leaving any
client. Where the weaker mode lets it through, the same attack is shown to SUCCEED under
``security=semi-honest`` (why that mode is only for an honest-but-curious server).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedstack.config import CONFIG_MESSAGE_KEY, compose_config, config_to_yaml
from fedstack.consortium import Identity, Member, Roster, simulation_consortium
from fedstack.crypto import signing
from fedstack.crypto.aead import associated_data, open_sealed
from fedstack.crypto.keys import KeyPair, derive_key, pair_keys
from fedstack.crypto.prg import expand
from fedstack.crypto.quantise import FixedPointCodec, auto_scale
from fedstack.crypto.shamir import SHARE_BYTES, reconstruct
from fedstack.policy import POLICY_REFUSED_CODE, NodePolicy
from fedstack.strategies import build_strategy
from fedstack.strategies.client_mods import protocol_mod
from fedstack.strategies.secagg import graph, statements, wire
from fedstack.strategies.secagg.client import (
    AD_SHARE,
    PURPOSE_MASK,
    PURPOSE_SELF_MASK,
    ClientTrust,
)
from fedstack.strategies.secagg.errors import SecAggAbort
from fedstack.strategies.secagg.messages import (
    Advert,
    ConsistencyRequest,
    MaskedInput,
    MaskRequest,
    RevealRequest,
    ShareRequest,
    UnmaskRequest,
)
from fedstack.strategies.secagg.mod import (
    MASKED_ARRAY,
    MASKED_RECORD,
    REFUSED_CODE,
    SECAGG_RECORD,
    protocol_params,
    refusal_reason,
)
from fedstack.strategies.secagg.params import ProtocolParams
from fedstack.strategies.secagg.server import ServerRound
from fedstack.strategies.secagg.simulate import SimulatedFederation
from fedstack.strategies.secagg.strategy import PHASE_CONSISTENCY, PHASE_UNMASK
from tests.inprocess_grid import RUN_ID, InProcessGrid

D = 8  # model size: the attacks do not depend on it
FIRST_NODE = 101


def _cfg(n: int, security: str, *extra: str):
    """The run config (composed once per setting: Hydra composition is the slow part)."""
    return _composed(n, security, extra)


@functools.cache
def _composed(n: int, security: str, extra: tuple[str, ...]):
    return compose_config(
        [
            "task=breast_cancer",
            "aggregation=secagg",
            f"aggregation.security={security}",
            "partition=iid",
            f"num_clients={n}",
            "num_rounds=3",
            *extra,
        ]
    )


def _update(partition: int, round_num: int) -> np.ndarray:
    """Client `partition`'s (secret) model in round `round_num`."""
    return np.linspace(-1, 1, D) * 0.1 * (partition + 1) + 0.01 * round_num


def _weight(partition: int) -> int:
    return 10 * (partition + 1) + 3


def fast_train(msg: Message, context: Context) -> Message:
    """A train handler without torch: a fixed, partition-specific update."""
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    arrays = ArrayRecord({"w": Array(_update(pid, server_round).astype(np.float32))})
    metrics = MetricRecord({"num-examples": _weight(pid), "partition-id": pid, "train-loss": 0.5})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def fast_evaluate(msg: Message, context: Context) -> Message:
    metrics = {"num-examples": 17, "eval-loss": 0.25, "eval-accuracy": 0.75, "partition-id": 0}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _client_app() -> ClientApp:
    app = ClientApp()
    app.train(mods=[protocol_mod])(fast_train)
    app.evaluate(mods=[protocol_mod])(fast_evaluate)
    return app


def _model() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(D, dtype=np.float32))})


def _revealed(reply: Message) -> int:
    """Shares a reply hands to the server (0 for a refusal)."""
    if reply.has_error():
        return 0
    record = reply.content.config_records.get(SECAGG_RECORD, {})
    return sum(
        len(record.get(f"urep.{kind}_shares", b"")) // SHARE_BYTES for kind in ("self", "key")
    )


def _refused(reply: Message, code: str) -> bool:
    if not reply.has_error():
        return False
    if reply.error.code == POLICY_REFUSED_CODE:
        return reply.error.reason == f"node policy refuses: {code}"
    return reply.error.code == REFUSED_CODE and reply.error.reason == refusal_reason(code)


class Server:
    """A server that drives real client mods message by message and may lie at any point."""

    def __init__(self, tmp_path: Path, n: int, security: str, *extra: str,
                 node_config: dict | None = None, run_id: int = RUN_ID) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
        cfg = _cfg(n, security, *extra)
        self.yaml = config_to_yaml(cfg)
        self.params = protocol_params(cfg)
        self.nodes = [FIRST_NODE + i for i in range(n)]
        self.run_id = run_id
        self.consortium = tmp_path / "consortium"
        simulation_consortium(self.consortium, n)
        self.roster = Roster.load(self.consortium / "roster.txt")
        self.contexts = {
            u: Context(run_id=run_id, node_id=u,
                       node_config={"partition-id": i, "num-partitions": n, **(node_config or {})},
                       state=RecordDict(), run_config={})
            for i, u in enumerate(self.nodes)
        }
        self.replies: list[Message] = []

    def identity(self, node: int) -> Identity:
        """A member's identity (a colluding client hands the server its key)."""
        index = self.nodes.index(node)
        return Identity.load(self.consortium / f"member-{index}.key", self.roster)

    def send(self, node: int, parts: dict, round_num: int, model: bool = False,
             kind: str = MessageType.TRAIN) -> Message:
        content = {
            "config": ConfigRecord({CONFIG_MESSAGE_KEY: self.yaml, "server-round": round_num}),
            SECAGG_RECORD: ConfigRecord({**parts, wire.CONSORTIUM: str(self.consortium)}),
        }
        if model:
            content["arrays"] = _model()
        msg = Message(RecordDict(content), dst_node_id=node, message_type=kind)
        reply = protocol_mod(msg, self.contexts[node],
                             fast_train if kind == MessageType.TRAIN else fast_evaluate)
        self.replies.append(reply)
        return reply

    @staticmethod
    def part(reply: Message) -> dict:
        assert not reply.has_error(), reply.error.reason
        return dict(reply.content.config_records[SECAGG_RECORD])

    def shares_left(self) -> int:
        return sum(_revealed(r) for r in self.replies)

    # -- honest stages --------------------------------------------------------------------
    def advertise(self, r: int, nodes: list[int] | None = None) -> dict[int, Advert]:
        return {u: wire.decode_advert(self.part(self.send(u, {wire.ADVERTISE_REQ: r}, r)), u)
                for u in nodes or self.nodes}

    def setup(self, r: int, nodes: list[int] | None = None) -> ServerRound:
        """Advertise, (reveal), share: an honest round up to the masked-input stage."""
        srv = ServerRound(r, self.params, D + 1, self.advertise(r, nodes), run_id=self.run_id)
        if srv.stage == "reveal":
            srv.receive_reveals({
                u: wire.decode_reveal_reply(
                    self.part(self.send(u, wire.encode_reveal_request(q), r)), u)
                for u, q in srv.reveal_requests().items()})
        self.mask_requests = srv.receive_shares({
            u: wire.decode_share_reply(self.part(self.send(u, wire.encode_share_request(q), r)), u)
            for u, q in srv.share_requests().items()})
        return srv

    def mask(self, r: int, requests: dict[int, MaskRequest]) -> dict[int, np.ndarray]:
        out = {}
        for u, q in requests.items():
            reply = self.send(u, wire.encode_mask_request(q), r, model=True)
            assert not reply.has_error(), reply.error.reason
            out[u] = reply.content.array_records[MASKED_RECORD][MASKED_ARRAY].numpy()
        return out


def _share_of(reply: Message, kind: str, owner: int) -> np.ndarray:
    part = dict(reply.content.config_records[SECAGG_RECORD])
    owners = wire.ids_from_bytes(part[f"urep.{kind}_owners"], "owners")
    blob = part[f"urep.{kind}_shares"]
    i = owners.index(owner)
    return np.frombuffer(blob[i * SHARE_BYTES:(i + 1) * SHARE_BYTES], dtype="<u4").astype(np.uint32)


# =========================================================================================
# In-process federation: 3 exchanges per steady round, exact sums, bounds, no evaluation
# =========================================================================================
class Logs:
    def __init__(self) -> None:
        self.rounds = []

    def on_round_end(self, round_log, arrays) -> None:
        self.rounds.append(round_log)


def _federation(tmp_path, n, security, rounds, *extra, hook=None):
    cfg = _cfg(n, security, f"num_rounds={rounds}", *extra)
    grid = InProcessGrid(_client_app(), num_nodes=n)
    grid.reply_hook = hook
    strategy = build_strategy(cfg, tmp_path / f"run-{security}")
    logs = Logs()
    config = ConfigRecord({CONFIG_MESSAGE_KEY: config_to_yaml(cfg)})
    result = strategy.start(grid, _model(), num_rounds=rounds, train_config=config,
                            evaluate_config=config, recorder=logs)
    return strategy, result, logs, grid


def _expected_mean(partitions, round_num):
    w = np.array([_weight(p) for p in partitions], dtype=np.float64)
    x = np.stack([_update(p, round_num).astype(np.float32).astype(np.float64)
                  for p in partitions])
    return (w[:, None] * x).sum(0) / w.sum()


@pytest.mark.parametrize("graph_name", ["complete", "sparse"])
def test_malicious_mode_needs_three_exchanges_per_steady_round(tmp_path, graph_name):
    extra = ["aggregation.graph=sparse", "aggregation.neighbours=4"] if graph_name == "sparse" \
        else []
    strategy, result, logs, grid = _federation(tmp_path, 6, "malicious", 3, *extra)
    assert [log.aborted for log in logs.rounds] == [None] * 3
    setup = 6 if graph_name == "sparse" else 5  # advertise, (reveal), share, train, cons., unmask
    assert [log.exchanges for log in logs.rounds] == [setup, 3, 3]
    assert {PHASE_CONSISTENCY, PHASE_UNMASK} <= set(logs.rounds[1].seconds)
    bound = strategy.params.codec.error_bound
    got = result.arrays["w"].numpy().astype(np.float64)
    assert np.abs(got - _expected_mean(range(6), 3)).max() <= bound + 1e-6
    # no federated evaluation under secagg: per-client metrics would leave in the clear
    assert not any(m.metadata.message_type == MessageType.EVALUATE for m in grid.sent)
    # the run proposed its simulation consortium to the (unpinned) nodes
    assert (tmp_path / "run-malicious/consortium/roster.txt").exists()


def test_survivor_that_does_not_sign_aborts_its_round_not_the_next(tmp_path):
    """A survivor whose view signature is lost: its self mask could not be removed, so the
    round aborts (model kept); the next round, set up in the same exchanges, completes."""

    def lose_signature(node, request, reply):
        parts = request.content.config_records.get(SECAGG_RECORD, {})
        return None if node == FIRST_NODE and parts.get(wire.CONSISTENCY_REQ) == 1 else reply

    _, result, logs, _ = _federation(tmp_path, 5, "malicious", 2, hook=lose_signature)
    assert "did not sign the survivor view" in logs.rounds[0].aborted
    assert logs.rounds[1].aborted is None and logs.rounds[1].exchanges == 3
    got = result.arrays["w"].numpy().astype(np.float64)
    assert np.abs(got - _expected_mean(range(5), 2)).max() <= 1e-3


def test_semi_honest_mode_still_needs_two(tmp_path):
    _, _, logs, _ = _federation(tmp_path, 5, "semi-honest", 2)
    assert [log.exchanges for log in logs.rounds] == [4, 2]


@pytest.mark.parametrize("security", ["semi-honest", "malicious"])
def test_malicious_client_offsetting_its_masked_words_aborts_the_round(tmp_path, security):
    """Attack 6: a client adds an offset to its masked words; the unmasked sum leaves the
    range clipped inputs can produce, so the round aborts and the model is kept."""

    def offset(node, request, reply):
        if node == FIRST_NODE and MASKED_RECORD in reply.content.array_records:
            words = reply.content.array_records[MASKED_RECORD][MASKED_ARRAY].numpy().copy()
            words[:1] += np.uint32(2**30)  # a huge coordinate, same weight
            reply.content.array_records[MASKED_RECORD] = ArrayRecord(
                {MASKED_ARRAY: Array(words)})
        return reply

    _, result, logs, _ = _federation(tmp_path, 5, security, 1, hook=offset)
    assert "outside what clipped inputs can produce" in logs.rounds[0].aborted
    assert np.array_equal(result.arrays["w"].numpy(), np.zeros(D, np.float32))


@pytest.mark.parametrize("security", ["semi-honest", "malicious"])
def test_total_weight_above_the_bound_aborts_the_round(tmp_path, security):
    """Attack 6: the weight word of one input is inflated beyond |U3| x max_weight."""

    def inflate(node, request, reply):
        if node == FIRST_NODE and MASKED_RECORD in reply.content.array_records:
            words = reply.content.array_records[MASKED_RECORD][MASKED_ARRAY].numpy().copy()
            words[-1:] += np.uint32(5 * 5000)
            reply.content.array_records[MASKED_RECORD] = ArrayRecord(
                {MASKED_ARRAY: Array(words)})
        return reply

    _, result, logs, _ = _federation(tmp_path, 5, security, 1, hook=inflate)
    assert "total weight outside" in logs.rounds[0].aborted
    assert np.array_equal(result.arrays["w"].numpy(), np.zeros(D, np.float32))


# =========================================================================================
# Attack 1: inconsistent survivor sets
# =========================================================================================
def _squeeze_target(server: Server, srv: ServerRound, target: int, r: int = 1):
    """Tell `target` that only t-1 peers shared (so it masks with them alone); everyone
    else gets the honest U1. Returns (those peers, the masked inputs)."""
    peers = [u for u in server.nodes if u != target][: srv.threshold - 1]
    requests = dict(server.mask_requests)
    honest = requests[target]
    requests[target] = MaskRequest(r, sorted([target, *peers]),
                                   {v: honest.ciphertexts[v] for v in peers})
    return peers, server.mask(r, requests)


def _secret(server: Server, srv: ServerRound, shares: dict[int, np.ndarray]) -> bytes:
    index = {v: i + 1 for i, v in enumerate(srv.participants)}
    holders = sorted(shares)[: srv.threshold]
    ys = np.stack([shares[h] for h in holders])[None]
    return reconstruct(np.array([index[h] for h in holders]), ys)[0].tobytes()


@pytest.mark.parametrize("n", [5, 8])
def test_inconsistent_survivor_sets_expose_a_client_in_semi_honest_mode(tmp_path, n):
    """Why semi-honest mode needs an honest server: the attack of issue 11 (item 1)
    recovers the target's exact update and example count with no colluding client."""
    server = Server(tmp_path, n, "semi-honest")
    srv = server.setup(1)
    target = server.nodes[-1]
    t = srv.threshold
    peers, masked = _squeeze_target(server, srv, target)
    # Non-overlapping, individually valid requests: each holder claims a different subset
    # of the target's peers dropped (never both kinds of share for one party).
    need = {p: t for p in peers}
    replies = {}
    for h in (u for u in server.nodes if u != target):
        claimed = sorted((p for p in peers if p != h and need[p] > 0), key=lambda p: -need[p])
        claimed = sorted(claimed[: n - t])
        for p in claimed:
            need[p] -= 1
        req = UnmaskRequest(1, sorted(set(server.nodes) - set(claimed)), claimed)
        replies[h] = server.send(h, wire.encode_unmask_request(req), 1)
        assert not replies[h].has_error()
    assert max(need.values()) <= 0
    seed = _secret(server, srv, {h: _share_of(rep, "self", target) for h, rep in replies.items()})
    words = masked[target].astype(np.uint32).copy()
    words -= expand(derive_key(seed, PURPOSE_SELF_MASK, 1, (target,)), D + 1, np.uint32, "aes")
    for p in peers:
        holders = {h: _share_of(rep, "key", p) for h, rep in replies.items()
                   if p in wire.ids_from_bytes(server.part(rep)["urep.key_owners"], "o")}
        sk = _secret(server, srv, holders)
        assert KeyPair.from_private(sk).public == srv.adverts[p].mask_pk
        key = pair_keys(sk, p, {target: srv.adverts[target].mask_pk}, PURPOSE_MASK, 1)[target]
        stream = expand(key, D + 1, np.uint32, "aes")
        words = words - stream if target < p else words + stream
    weighted, weight = server.params.codec.decode(words)
    partition = server.nodes.index(target)
    assert weight == _weight(partition)  # the target's exact n_k ...
    assert np.abs(weighted / weight - _update(partition, 1)).max() <= 1e-3  # ... and update


@pytest.mark.parametrize("n", [5, 8])
def test_inconsistent_survivor_sets_are_refused_in_malicious_mode(tmp_path, n):
    server = Server(tmp_path, n, "malicious")
    srv = server.setup(1)
    target = server.nodes[-1]
    peers, _ = _squeeze_target(server, srv, target)
    everyone = list(server.nodes)
    u1_target = sorted([target, *peers])
    # The server shows the target its small world and everyone else a world in which the
    # target's peers dropped; it collects what signatures it can.
    sigs = {}
    reply = server.send(target, wire.encode_consistency_request(
        srv_consistency(1, u1_target, u1_target)), 1)
    sigs[target] = wire.decode_consistency_reply(server.part(reply), target).signature
    others_u3 = sorted(set(everyone) - set(peers))
    for u in everyone:
        if u == target:
            continue
        reply = server.send(u, wire.encode_consistency_request(
            srv_consistency(1, everyone, others_u3)), 1)
        if u in peers:  # a peer told it dropped refuses to sign
            assert _refused(reply, "view")
        elif len(others_u3) < srv.threshold:  # n = 8: too few survivors left to sign at all
            assert _refused(reply, "threshold")
        else:
            sigs[u] = wire.decode_consistency_reply(server.part(reply), u).signature
        # the target's view shown to a party that masked under the full U1 is refused too
        assert _refused(server.send(u, wire.encode_consistency_request(
            srv_consistency(1, u1_target, u1_target)), 1), "view")
    # Unmask: every holder asked for what the attack needs, with all signatures collected.
    for h in everyone:
        if h == target:
            req = UnmaskRequest(1, u1_target, [], sigs)
        else:
            req = UnmaskRequest(1, others_u3, sorted(set(peers) - {h}), sigs)
        reply = server.send(h, wire.encode_unmask_request(req), 1)
        assert _refused(reply, "signature") or _refused(reply, "stale")
    # the target's own signature does not verify for anyone else's view, and the peers'
    # signatures (on nothing) are missing: no share left any client
    assert server.shares_left() == 0


def srv_consistency(r, shared, survivors) -> ConsistencyRequest:
    return ConsistencyRequest(r, sorted(shared), sorted(survivors))


# =========================================================================================
# Attack 2: key substitution and Sybil keys
# =========================================================================================
def _resign(adv: Advert, key, run_id: int = RUN_ID, **changes) -> Advert:
    """`adv` with `changes`, signed by `key` (an Ed25519 private key)."""
    unsigned = replace(adv, signature=b"", signer=signing.public_bytes(key), **changes)
    sig = signing.sign(key, statements.advert_statement(run_id, unsigned))
    return replace(unsigned, signature=sig)


def test_key_substitution_succeeds_in_semi_honest_mode(tmp_path):
    """Nothing authenticates a peer's key there: the target encrypts its shares to keys the
    server made, and the server reads them."""
    server = Server(tmp_path, 5, "semi-honest")
    srv = ServerRound(1, server.params, D + 1, server.advertise(1), run_id=RUN_ID)
    target, victim = server.nodes[0], server.nodes[1]
    fake = KeyPair.generate()
    req = srv.share_requests()[target]
    keys = dict(req.keys)
    keys[victim] = (fake.public, KeyPair.generate().public)
    reply = server.send(target, wire.encode_share_request(replace(req, keys=keys)), 1)
    ct = wire.decode_share_reply(server.part(reply), target).ciphertexts[victim]
    key = pair_keys(fake.private, victim, {target: srv.adverts[target].enc_pk}, "share-enc", 1)
    plain = open_sealed(key[target], ct, associated_data(AD_SHARE, 1, target, victim))
    assert len(plain) == 24 + 2 * SHARE_BYTES  # the server holds the target's shares for v


@pytest.mark.parametrize("attack", ["swapped-keys", "outsider-signer", "sybil", "extra-party"])
def test_key_substitution_and_sybils_are_refused_in_malicious_mode(tmp_path, attack):
    server = Server(tmp_path, 5, "malicious")
    adverts = server.advertise(1)
    target, victim = server.nodes[0], server.nodes[1]
    outsider = signing.generate()
    fake = KeyPair.generate()
    if attack == "swapped-keys":  # the victim's signature kept, its keys replaced
        adverts[victim] = replace(adverts[victim], enc_pk=fake.public)
    elif attack == "outsider-signer":  # re-signed by a key outside the roster
        adverts[victim] = _resign(adverts[victim], outsider, enc_pk=fake.public)
    elif attack == "sybil":  # a colluding member signs the victim's slot with its own key
        colluder = server.identity(server.nodes[2]).key
        adverts[victim] = _resign(adverts[victim], colluder, enc_pk=fake.public)
    else:  # a party that does not exist, signed by the server's own key
        adverts[999] = _resign(Advert(999, 1, fake.public, KeyPair.generate().public,
                                      b"\0" * 32), outsider, commit=b"\1" * 32)
    p_digest = statements.participants_digest(RUN_ID, 1, adverts)
    seed = statements.agreed_seed(RUN_ID, 1, p_digest, None)
    req = ShareRequest(1, seed, sorted(adverts), {}, adverts, {})
    reply = server.send(target, wire.encode_share_request(req), 1)
    assert _refused(reply, "signature")
    assert server.shares_left() == 0


# =========================================================================================
# Attack 3: graph grinding (server-chosen seed)
# =========================================================================================
def _ground_seed(nodes, target, colluders, degree):
    """A seed whose graph puts only colluders around the target (found by grinding)."""
    for i in range(5000):
        seed = i.to_bytes(32, "big")
        if set(graph.neighbours_of(seed, 1, nodes, degree, target)) <= set(colluders):
            return seed
    raise AssertionError("no seed found")


SPARSE = ("aggregation.graph=sparse", "aggregation.neighbours=4")


def test_graph_grinding_succeeds_in_semi_honest_mode(tmp_path):
    server = Server(tmp_path, 8, "semi-honest", *SPARSE)
    srv = ServerRound(1, server.params, D + 1, server.advertise(1), run_id=RUN_ID)
    target, colluders = server.nodes[0], server.nodes[1:6]
    seed = _ground_seed(server.nodes, target, colluders, 4)
    nbrs = graph.neighbours_of(seed, 1, server.nodes, 4, target)
    keys = {v: (srv.adverts[v].enc_pk, srv.adverts[v].mask_pk) for v in [*nbrs, target]}
    req = ShareRequest(1, seed, list(server.nodes), keys)
    reply = server.send(target, wire.encode_share_request(req), 1)
    shared_to = wire.decode_share_reply(server.part(reply), target).ciphertexts
    assert set(shared_to) <= set(colluders)  # every share holder of the target colludes


def test_graph_grinding_is_refused_in_malicious_mode(tmp_path):
    server = Server(tmp_path, 8, "malicious", *SPARSE)
    srv = ServerRound(1, server.params, D + 1, server.advertise(1), run_id=RUN_ID)
    target, colluders = server.nodes[0], server.nodes[1:6]
    reveals = {u: wire.decode_reveal_reply(
        server.part(server.send(u, wire.encode_reveal_request(q), 1)), u)
        for u, q in srv.reveal_requests().items()}
    # a second participant set (to pick the better of two seeds) gets no second nonce
    fewer = {u: a for u, a in srv.adverts.items() if u != server.nodes[-1]}
    again = server.send(target, wire.encode_reveal_request(RevealRequest(1, sorted(fewer), fewer)),
                        1)
    assert _refused(again, "view")
    srv.receive_reveals(reveals)
    honest = srv.share_requests()[target]
    ground = _ground_seed(server.nodes, target, colluders, 4)
    assert ground != srv.seed
    assert _refused(server.send(target, wire.encode_share_request(replace(honest, seed=ground)),
                                1), "view")
    # leaving out one reveal (to drop a nonce the server dislikes) is refused too
    partial = dict(honest.reveals)
    partial.pop(server.nodes[-1])
    assert _refused(server.send(target, wire.encode_share_request(replace(honest,
                                reveals=partial)), 1), "signature")
    # a forged nonce for another party does not open its commitment
    forged = dict(honest.reveals)
    forged[server.nodes[-1]] = (b"\7" * 32, forged[server.nodes[-1]][1])
    assert _refused(server.send(target, wire.encode_share_request(replace(honest,
                                reveals=forged)), 1), "signature")
    assert server.shares_left() == 0
    # the honest request is still answered: refusals left the state untouched
    assert not server.send(target, wire.encode_share_request(honest), 1).has_error()


def test_server_cannot_drop_a_reveal_to_choose_the_seed():
    """A participant whose nonce is missing aborts the round: the server cannot leave out
    the nonce it dislikes and keep the rest (it must restart with fresh adverts)."""
    nodes = list(range(1, 9))
    ids = {u: Identity(f"m{u}", signing.generate()) for u in nodes}
    roster = Roster([Member(i.name, i.public) for i in ids.values()])
    codec = FixedPointCodec(32, 2.0, auto_scale(32, 2.0, 16, 100), 16, 100)
    params = ProtocolParams(codec, graph="sparse", neighbours=4, security="malicious")
    fed = SimulatedFederation(params, nodes, run_id=3,
                              trusts={u: ClientTrust(3, ids[u], roster, NodePolicy())
                                      for u in nodes})
    inputs = {u: (np.full(4, 0.5), 2) for u in nodes}
    with pytest.raises(SecAggAbort, match="did not reveal"):
        fed.run_round(1, inputs, drop={"reveal": {5}})
    weighted, weight, _ = SimulatedFederation(
        params, nodes, run_id=3,
        trusts={u: ClientTrust(3, ids[u], roster, NodePolicy()) for u in nodes},
    ).run_round(1, inputs)
    assert weight == 16 and np.allclose(weighted / weight, 0.5)


# =========================================================================================
# Attack 4: server-set trust parameters (t, cohort, security) against the node's policy
# =========================================================================================
@pytest.mark.parametrize("security", ["semi-honest", "malicious"])
def test_lowered_threshold_and_tiny_cohorts_are_refused(tmp_path, security):
    # the server proposes t = 0.6 of the neighbourhood (3 of 5); this node's policy wants 0.7
    server = Server(tmp_path, 5, security, node_config={"min-threshold": 0.7})
    srv = ServerRound(1, server.params, D + 1, server.advertise(1), run_id=RUN_ID)
    target = server.nodes[0]
    assert _refused(server.send(target, wire.encode_share_request(srv.share_requests()[target]),
                                1), "threshold")
    # a two-party cohort (default policy: at least 3)
    server = Server(tmp_path / "two", 5, security)
    pair = server.nodes[:2]
    srv = ServerRound(1, server.params, D + 1, server.advertise(1, pair), run_id=RUN_ID)
    assert _refused(server.send(pair[0], wire.encode_share_request(srv.share_requests()[pair[0]]),
                                1), "cohort")
    # t recomputed by the client: the config claims few clients (so threshold=3 validates),
    # then 9 parties share: t = 3 of 9 is below half and refused
    server = Server(tmp_path / "nine", 9, security)
    adverts = server.advertise(1)
    req = ServerRound(1, server.params, D + 1, adverts, run_id=RUN_ID).share_requests()
    server.yaml = server.yaml.replace("threshold: 0.6", "threshold: 3.0").replace(
        "num_clients: 9", "num_clients: 4")
    assert "threshold: 3.0" in server.yaml and "num_clients: 4" in server.yaml
    assert _refused(server.send(server.nodes[0], wire.encode_share_request(req[server.nodes[0]]),
                                1), "threshold")
    assert server.shares_left() == 0


def test_node_that_pins_a_roster_refuses_semi_honest_rounds(tmp_path):
    server = Server(tmp_path, 5, "semi-honest")
    node = server.nodes[0]
    server.contexts[node].node_config.update({
        "roster": str(server.consortium / "roster.txt"),
        "identity-key": str(server.consortium / "member-0.key"),
    })
    srv = ServerRound(1, server.params, D + 1, server.advertise(1), run_id=RUN_ID)
    assert _refused(server.send(node, wire.encode_share_request(srv.share_requests()[node]), 1),
                    "security")


def test_node_that_pins_its_roster_ignores_the_run_consortium(tmp_path):
    """A node with its own roster never trusts keys the run proposes: adverts signed by the
    run's members are refused when they are not in the node's roster."""
    server = Server(tmp_path, 5, "malicious")
    own = tmp_path / "own"
    simulation_consortium(own, 5)  # another consortium: other keys, same member names
    node = server.nodes[0]
    server.contexts[node].node_config.update({
        "roster": str(own / "roster.txt"), "identity-key": str(own / "member-0.key")})
    srv = ServerRound(1, server.params, D + 1, server.advertise(1), run_id=RUN_ID)
    assert _refused(server.send(node, wire.encode_share_request(srv.share_requests()[node]), 1),
                    "signature")


# =========================================================================================
# Attack 5: clear-text side channels under secagg
# =========================================================================================
def test_evaluate_replies_and_refusals_carry_nothing_from_the_data(tmp_path):
    server = Server(tmp_path, 5, "malicious", "aggregation.max_weight=11")
    node = server.nodes[2]  # weight 23 > max_weight 11: it cannot encode its update
    reply = server.send(node, {}, 1, model=True, kind=MessageType.EVALUATE)
    assert dict(reply.content.metric_records["metrics"]) == {"partition-id": 0}
    srv = server.setup(1)
    reply = server.send(node, wire.encode_mask_request(server.mask_requests[node]), 1,
                        model=True)
    part = server.part(reply)
    assert part[wire.FAILED] == "encode"  # a fixed code: not "weight 23 outside ..."
    assert MASKED_RECORD not in reply.content.array_records
    assert set(reply.content.metric_records.get("metrics", {})) <= {"partition-id"}
    assert srv.threshold == 3


# =========================================================================================
# Attack 7: a sparse graph cut into small components by dropouts
# =========================================================================================
def _cut_ring(server: Server, srv: ServerRound) -> tuple[list[int], list[int]]:
    """Drop two pairs of ring neighbours: (k = 4) the survivors fall into a 3-client arc
    and the rest."""
    order = graph.ring_order(srv.seed, 1, srv.participants)
    dropped = [order[0], order[1], order[5], order[6]]
    return sorted(set(srv.participants) - set(dropped)), dropped


def test_cut_sparse_graph_leaks_an_arc_sum_in_semi_honest_mode(tmp_path):
    server = Server(tmp_path, 10, "semi-honest", *SPARSE)
    srv = server.setup(1)
    survivors, dropped = _cut_ring(server, srv)
    masked = server.mask(1, {u: q for u, q in server.mask_requests.items() if u in survivors})
    requests = srv.receive_masked({u: _masked(u, masked[u]) for u in survivors})
    replies = {u: server.send(u, wire.encode_unmask_request(q), 1) for u, q in requests.items()}
    assert all(not r.has_error() for r in replies.values())
    order = graph.ring_order(srv.seed, 1, srv.participants)
    arc = order[2:5]  # cut off on both sides
    total = sum(masked[u].astype(np.uint32) for u in arc)
    for u in arc:  # its self mask, from the survivors' self-mask shares
        seed = _secret(server, srv, {h: _share_of(r, "self", u) for h, r in replies.items()
                                     if u in requests[h].reveal_self})
        total -= expand(derive_key(seed, PURPOSE_SELF_MASK, 1, (u,)), D + 1, np.uint32, "aes")
    for d in dropped:  # the dropped parties' masks with the arc, from their mask keys
        sk = _secret(server, srv, {h: _share_of(r, "key", d) for h, r in replies.items()
                                   if d in requests[h].reveal_key})
        for u in set(srv.nbrs[d]) & set(arc):
            key = pair_keys(sk, d, {u: srv.adverts[u].mask_pk}, PURPOSE_MASK, 1)[u]
            stream = expand(key, D + 1, np.uint32, "aes")
            total = total - stream if u < d else total + stream
    _, weight = server.params.codec.decode(total)
    assert weight == sum(_weight(server.nodes.index(u)) for u in arc)  # a 3-client sum


def _masked(node, words, r=1) -> MaskedInput:
    return MaskedInput(node, r, words)


def test_cut_sparse_graph_is_refused_in_malicious_mode(tmp_path):
    server = Server(tmp_path, 10, "malicious", *SPARSE, node_config={"min-cohort": 4})
    srv = server.setup(1)
    survivors, _ = _cut_ring(server, srv)
    server.mask(1, {u: q for u, q in server.mask_requests.items() if u in survivors})
    for u in survivors:
        reply = server.send(u, wire.encode_consistency_request(
            srv_consistency(1, srv.shared, survivors)), 1)
        assert _refused(reply, "connectivity")
        reply = server.send(u, wire.encode_unmask_request(UnmaskRequest(1, [u], [], {})), 1)
        assert _refused(reply, "stale")
    assert server.shares_left() == 0


# =========================================================================================
# Replayed, reordered and cross-round messages
# =========================================================================================
def _signed_round(server: Server, r: int):
    """An honest malicious-mode round up to the collected view signatures."""
    srv = server.setup(r)
    masked = server.mask(r, server.mask_requests)
    creqs = srv.receive_masked({u: _masked(u, w, r) for u, w in masked.items()})
    sigs = {u: wire.decode_consistency_reply(
        server.part(server.send(u, wire.encode_consistency_request(q), r)), u)
        for u, q in creqs.items()}
    return srv, srv.receive_consistency(sigs)


def test_replayed_reordered_and_cross_round_messages_are_refused(tmp_path):
    server = Server(tmp_path, 5, "malicious")
    u = server.nodes[0]
    # reordered: a mask, consistency or unmask request before the round's keys were shared
    adverts = server.advertise(1)
    srv = ServerRound(1, server.params, D + 1, adverts, run_id=RUN_ID)
    early = MaskRequest(1, list(server.nodes), {})
    assert _refused(server.send(u, wire.encode_mask_request(early), 1, model=True), "stale")
    assert _refused(server.send(u, wire.encode_consistency_request(
        srv_consistency(1, server.nodes, server.nodes)), 1), "stale")
    assert _refused(server.send(u, wire.encode_unmask_request(UnmaskRequest(1, [u], [])), 1),
                    "stale")
    shares = {v: wire.decode_share_reply(server.part(server.send(
        v, wire.encode_share_request(q), 1)), v) for v, q in srv.share_requests().items()}
    # replayed share request: the round moved on
    assert _refused(server.send(u, wire.encode_share_request(srv.share_requests()[u]), 1),
                    "stale")
    mreqs = srv.receive_shares(shares)
    masked = server.mask(1, mreqs)
    creqs = srv.receive_masked({v: _masked(v, w, 1) for v, w in masked.items()})
    # unmask before the view is signed
    assert _refused(server.send(u, wire.encode_unmask_request(
        UnmaskRequest(1, creqs[u].survivors, [])), 1), "stale")
    sigs = {v: wire.decode_consistency_reply(server.part(server.send(
        v, wire.encode_consistency_request(q), 1)), v) for v, q in creqs.items()}
    # replayed consistency request: the same signature again, nothing else
    again = server.send(u, wire.encode_consistency_request(creqs[u]), 1)
    assert wire.decode_consistency_reply(server.part(again), u).signature == sigs[u].signature
    ureqs = srv.receive_consistency(sigs)
    assert server.shares_left() == 0
    first = server.send(u, wire.encode_unmask_request(ureqs[u]), 1)
    assert _revealed(first) == 2 * len(server.nodes) - len(server.nodes)  # b-shares of all 5
    # replayed unmask request: one answer per round
    assert _refused(server.send(u, wire.encode_unmask_request(ureqs[u]), 1), "stale")
    before = server.shares_left()
    # cross-round: round 1's view signatures presented in round 2
    srv2 = server.setup(2)
    masked2 = server.mask(2, server.mask_requests)
    creqs2 = srv2.receive_masked({v: _masked(v, w, 2) for v, w in masked2.items()})
    for v, q in creqs2.items():
        server.send(v, wire.encode_consistency_request(q), 2)
    stale_sigs = {v: s.signature for v, s in sigs.items()}
    req2 = UnmaskRequest(2, creqs2[u].survivors, [], stale_sigs)
    assert _refused(server.send(u, wire.encode_unmask_request(req2), 2), "signature")
    # cross-round adverts: the peers' round-1 signed adverts in a round-3 share request
    fresh = server.advertise(3)
    mixed = {v: (fresh[v] if v == u else adverts[v]) for v in server.nodes}
    p_digest = statements.participants_digest(RUN_ID, 3, mixed)
    stale = ShareRequest(3, statements.agreed_seed(RUN_ID, 3, p_digest, None),
                         list(server.nodes), {}, mixed, {})
    assert _refused(server.send(u, wire.encode_share_request(stale), 3), "signature")
    assert server.shares_left() == before


def test_adverts_signed_for_another_run_are_refused(tmp_path):
    """Every statement binds the run id: the same members' adverts from another run (same
    consortium, same round, same node ids) do not verify."""
    other_run = Server(tmp_path, 5, "malicious", run_id=RUN_ID + 1).advertise(1)
    server = Server(tmp_path, 5, "malicious")
    u = server.nodes[0]
    mixed = {**other_run, u: server.advertise(1, [u])[u]}
    p_digest = statements.participants_digest(RUN_ID, 1, mixed)
    req = ShareRequest(1, statements.agreed_seed(RUN_ID, 1, p_digest, None), list(server.nodes),
                       {}, mixed, {})
    assert _refused(server.send(u, wire.encode_share_request(req), 1), "signature")
    assert server.shares_left() == 0


def test_sparse_view_needs_a_global_quorum_not_just_the_neighbourhood(tmp_path):
    """Split views in a sparse graph: signatures of a client's own neighbourhood alone (what
    a server running two views in two regions of the graph could show each region) are not
    enough; the view needs q = view_quorum(|P|) signers of U3, and honest members sign one
    view, so two views need 2q - |P| colluders."""
    server = Server(tmp_path, 10, "malicious", *SPARSE)
    srv, requests = _signed_round(server, 1)
    u = server.nodes[0]
    local = set(srv.nbrs[u]) | {u}
    quorum = server.params.view_quorum(10)
    assert len(local) < quorum <= len(srv.survivors)
    only_local = replace(requests[u], signatures={v: requests[u].signatures[v] for v in local})
    assert _refused(server.send(u, wire.encode_unmask_request(only_local), 1), "signature")
    assert server.shares_left() == 0
    assert _revealed(server.send(u, wire.encode_unmask_request(requests[u]), 1)) > 0


# =========================================================================================
# dp=distributed: a lying server cannot unmask a sum with less noise than planned
# =========================================================================================
def test_view_with_fewer_survivors_than_the_dp_noise_needs_is_refused(tmp_path):
    """Each client added 1/n_min of the Skellam noise (n_min = ceil(0.9 * 10) = 9): a view of
    8 survivors would pass t, the quorum and the cohort, but its sum would carry less noise
    than the accountant counts, so every client refuses to sign it and reveals nothing."""
    distributed = ("dp=distributed", "dp.noise_multiplier=1.0", "dp.target_epsilon=null",
                   "dp.dropout_slack=0.1")
    server = Server(tmp_path, 10, "malicious", *distributed)
    srv = server.setup(1)
    survivors = server.nodes[:8]
    server.mask(1, {u: q for u, q in server.mask_requests.items() if u in survivors})
    for u in survivors:
        reply = server.send(u, wire.encode_consistency_request(
            srv_consistency(1, srv.shared, survivors)), 1)
        assert _refused(reply, "cohort")
    assert server.shares_left() == 0
    # the same view with 9 survivors is signed
    server = Server(tmp_path / "nine", 10, "malicious", *distributed)
    srv = server.setup(1)
    survivors = server.nodes[:9]
    server.mask(1, {u: q for u, q in server.mask_requests.items() if u in survivors})
    reply = server.send(survivors[0], wire.encode_consistency_request(
        srv_consistency(1, srv.shared, survivors)), 1)
    assert not reply.has_error(), reply.error.reason
