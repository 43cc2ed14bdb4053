"""A well-formed forged HE reply: detected, rolled back, traced to its sender, excluded.

Two forgeries the server's validation cannot catch (it cannot decrypt): SEAL-valid ciphertexts
with uniformly random coefficients, and an honest-looking reply encrypted under another key
but labelled with the server's key fingerprint. Both are driven through the real ClientApp and
HE mod with the in-process grid.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.superlink.grid import HttpGrid

import fedstack.strategies.he.mod as he_mod_module
from fedstack.client_app import app as client_app
from fedstack.config import CONFIG_MESSAGE_KEY, compose_config, config_to_yaml, settings_of
from fedstack.strategies import build_strategy
from fedstack.strategies.he.ckks import (
    AggregateCheckError,
    EncryptedSum,
    EncryptedVector,
    aggregate,
    decrypt_mean,
    encrypt_update,
)
from fedstack.strategies.he.cli import keys_main
from fedstack.strategies.he.group_test import CulpritSearch, isolated_reply
from fedstack.strategies.he.keys import (
    PUBLIC_CONTEXT_FILENAME,
    SECRET_CONTEXT_FILENAME,
    HEKeyError,
    PublicContext,
    SecretContext,
    generate_keys,
    load_public_context,
    load_secret_context,
)
from fedstack.strategies.he.messages import (
    CHECK_GROUP,
    CHECK_KEY,
    CHECK_MEMBERS_KEY,
    CHECK_OK_KEY,
    CHECK_REPLIES_KEY,
    CHECK_REPLY_RECORD,
    CHECK_ROUND_KEY,
    FINGERPRINT_KEY,
    HE_CHECK_REFUSED_CODE,
    HE_RECORD,
    HE_UNDECRYPTABLE_CODE,
    SIMULATION_SECRET_KEY,
    UNDECRYPTABLE_REASON,
)
from fedstack.strategies.he.presets import DEFAULT_PRESET, PRESETS
from fedstack.strategies.he.provisioning import (
    SIMULATION_KEY_DIR,
    check_server_key_source,
    server_keys,
)
from fedstack.strategies.he.records import (
    ArrayLayout,
    encrypted_from_record,
    encrypted_to_record,
    model_from_record,
    model_to_record,
)
from fedstack.strategies.he.seal_io import build_ciphertext_blob
from fedstack.strategies.he.strategy import CULPRIT_REASON
from fedstack.strategies.runtime import is_deployment
from fedstack.task.models import build_model
from tests.inprocess_grid import InProcessGrid

NUM_CLIENTS = 6
NUM_ROUNDS = 3
BAD_ROUND = 2
CULPRIT = 103  # node ids are 101.. in the in-process grid
MAX_ABS = 16.0
MAX_WEIGHT = 10_000
SCALE_BITS = 30


# ----------------------------------------------------------------------------- forgeries


def forge_random(ctx: PublicContext, like: EncryptedVector,
                 rng: np.random.Generator) -> EncryptedVector:
    """SEAL-valid ciphertexts (every coefficient below its prime) with random contents."""
    n = ctx.preset.poly_modulus_degree
    parts = []
    for _ in range(like.count):
        coeffs = np.concatenate([rng.integers(0, p, n, dtype=np.uint64)
                                 for _poly in range(2) for p in ctx.data_primes])
        parts.append(build_ciphertext_blob(
            version=ctx.seal_version, parms_id=ctx.first_parms_id, poly_modulus_degree=n,
            coeff_modulus_size=len(ctx.data_primes), scale=2.0**like.scale_bits,
            coeffs=coeffs))
    return EncryptedVector(
        kind="full", fingerprint=ctx.fingerprint, dim=like.dim, scale_bits=like.scale_bits,
        num_terms=1, lengths=np.array([len(p) for p in parts], dtype=np.int64),
        blob=np.frombuffer(b"".join(parts), dtype=np.uint8).copy())


_OTHER_KEY: list[SecretContext] = []


def forge_other_key(ctx: PublicContext, like: EncryptedVector,
                    rng: np.random.Generator) -> EncryptedVector:
    """A plausible update under another key of the same preset, labelled with ours."""
    if not _OTHER_KEY:
        _OTHER_KEY.append(generate_keys(ctx.preset))
    fake = encrypt_update(_OTHER_KEY[0], rng.normal(0.0, 0.1, like.dim), 40,
                          scale_bits=like.scale_bits, max_abs_value=MAX_ABS,
                          max_weight=MAX_WEIGHT)
    return dataclasses.replace(fake, fingerprint=ctx.fingerprint)


FORGERIES = {"random": forge_random, "other-key": forge_other_key}


# ------------------------------------------------------------------- the CKKS-level check


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    return generate_keys(PRESETS[DEFAULT_PRESET])


def _honest(ctx: SecretContext, dim: int, k: int, seed: int = 0) -> list[EncryptedVector]:
    rng = np.random.default_rng(seed)
    return [encrypt_update(ctx, rng.normal(0.0, 0.2, dim), 10 + i, scale_bits=SCALE_BITS,
                           max_abs_value=MAX_ABS, max_weight=MAX_WEIGHT) for i in range(k)]


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_reply_passes_the_servers_validation_but_not_the_clients_check(secret, forgery):
    dim = 5000
    honest = _honest(secret, dim, 3)
    public = secret.public_only()
    forged = FORGERIES[forgery](public, honest[0], np.random.default_rng(1))
    forged = EncryptedVector.from_arrays(forged.to_arrays())  # through the wire form
    total = EncryptedSum(public, dim=dim, scale_bits=SCALE_BITS, max_terms=10)
    for reply in [*honest, forged]:
        total.add(reply)  # the server accepts it: it looks like any other reply
    with pytest.raises(AggregateCheckError, match="check slots"):
        decrypt_mean(secret, total.result(), max_weight=MAX_WEIGHT, max_abs_value=MAX_ABS)
    good = aggregate(public, honest, scale_bits=SCALE_BITS, max_terms=10)
    assert decrypt_mean(secret, good, max_weight=MAX_WEIGHT,
                        max_abs_value=MAX_ABS).total_weight == 10 + 11 + 12


def test_one_forged_ciphertext_among_good_ones_is_caught(secret):
    """Every ciphertext has its own check slot: a bad first chunk (no weight slot) is seen."""
    dim = 3 * 2047
    honest = _honest(secret, dim, 2, seed=3)
    public = secret.public_only()
    random_first = bytes(forge_random(public, honest[1], np.random.default_rng(2)).chunks()[0])
    # The honest reply's ciphertexts (re-serialised in full form) but a random first one.
    seal = [random_first, *_full_chunks(secret, honest[1])[1:]]
    assert len(seal) == honest[1].count == 4
    mixed = dataclasses.replace(
        honest[1], kind="full", lengths=np.array([len(c) for c in seal], dtype=np.int64),
        blob=np.frombuffer(b"".join(seal), dtype=np.uint8).copy())
    total = aggregate(public, [honest[0], mixed], scale_bits=SCALE_BITS, max_terms=10)
    with pytest.raises(AggregateCheckError, match="check slots"):
        decrypt_mean(secret, total)


def _full_chunks(ctx: SecretContext, ev: EncryptedVector) -> list[bytes]:
    """The reply's ciphertexts re-serialised uncompressed (same content as the seeded ones)."""
    from fedstack.strategies.he.ckks import _Loader
    from fedstack.strategies.he.seal_io import Scratch

    loader = _Loader(ctx, ev.scale_bits)
    scratch = Scratch()
    try:
        return [scratch.save(loader.load(c, ev.kind, i)) for i, c in enumerate(ev.chunks())]
    finally:
        scratch.close()
        loader.close()


def test_values_beyond_the_bounds_fail_the_check(secret):
    """A key holder can encrypt anything; values beyond max_abs_value are still caught."""
    dim = 100
    honest = _honest(secret, dim, 2)
    big = encrypt_update(secret, np.full(dim, 100.0), 5, scale_bits=SCALE_BITS,
                         max_abs_value=1000.0, max_weight=MAX_WEIGHT)
    total = aggregate(secret.public_only(), [*honest, big], scale_bits=SCALE_BITS,
                      max_terms=10)
    with pytest.raises(AggregateCheckError, match="max_abs_value"):
        decrypt_mean(secret, total, max_weight=MAX_WEIGHT, max_abs_value=MAX_ABS)
    assert decrypt_mean(secret, total, max_weight=MAX_WEIGHT).num_terms == 3


# ------------------------------------------------------------------ the search alone


def test_isolation_rule_covers_differences_and_combinations():
    replies = [1, 2, 3, 4, 5, 6]
    assert isolated_reply(1, replies, [[2, 3]]) is None
    assert isolated_reply(1, replies, [[2, 3], [2, 3, 4]]) == 4  # two groups, one apart
    assert isolated_reply(1, replies, [[2, 3], [3, 4], [2, 4]]) is not None  # (a+b+c)/2 ...
    assert isolated_reply(1, replies, [[2, 3, 4, 5]]) == 6  # total - own - group
    assert isolated_reply(1, replies, [[2, 3, 4, 5, 6]]) is None  # total - own: no news
    assert isolated_reply(9, replies, [[1, 2, 3, 4, 5]]) == 6  # an outsider knows no own


def _simulate(m: int, culprits: set[int], silent: set[int]) -> CulpritSearch:
    search = CulpritSearch(replies=tuple(range(1, m + 1)), testers=tuple(range(1, m + 1)))
    while tests := search.plan():
        for test in tests:
            answer = None if test.tester in silent else not set(test.members) & culprits
            search.record(test, answer)
    return search


@pytest.mark.parametrize("m", [6, 7, 10, 25, 100])
def test_search_finds_one_culprit_in_two_exchanges_within_the_rules(m):
    for culprit in sorted({1, 2, m // 2, m - 1, m}):
        for silent in (set(), {culprit}):  # a forger under another key cannot even decrypt
            search = _simulate(m, {culprit}, silent)
            assert search.culprits == {culprit} and search.outcome() == "identified"
            # A silent culprit leaves the block it was to test open: one more exchange when
            # there are few testers to spread the padded tests over.
            assert search.exchanges <= (2 if not silent or m >= 12 else 3)
            assert len(search.tests) <= 3 * math.isqrt(m) + 3  # blocks, 2 padded blocks
            for tester in range(1, m + 1):
                seen = search.seen_by(tester)
                assert all(len(g) >= 2 and tester not in g for g in seen)
                assert isolated_reply(tester, search.replies, seen) is None


def test_search_never_convicts_an_honest_reply_and_gives_up_when_it_must():
    for culprits in ({1, 2}, {3, 9}, {1, 5, 9}):
        search = _simulate(10, culprits, silent=culprits)
        assert search.culprits <= culprits and search.culprits
    two = _simulate(2, {1}, set())
    assert two.outcome() == "unresolved" and not two.tests


# ------------------------------------------------------------- the federation, end to end


def _cfg(tmp_path: Path, *extra: str):
    return compose_config([
        "task=breast_cancer", "aggregation=he", "partition=iid",
        f"num_clients={NUM_CLIENTS}", f"num_rounds={NUM_ROUNDS}", f"output_dir={tmp_path}",
        *extra,
    ])


class _History:
    """A recorder that keeps every round's log and the model the round ended with."""

    def __init__(self) -> None:
        self.rounds: list[tuple[dict, ArrayRecord]] = []
        self.trained_from: list[ArrayRecord] = []

    def on_round_end(self, round_log, arrays: ArrayRecord) -> None:
        self.rounds.append((round_log.to_json(), arrays))


def _round_of(request: Message) -> int:
    return int(request.content.config_records["config"]["server-round"])


def _forging_hook(forge, culprit: int, bad_round: int, errors: list[Message]):
    rng = np.random.default_rng(7)

    def hook(node: int, request: Message, reply: Message) -> Message:
        if reply.has_error():
            errors.append(reply)
            return reply
        he = request.content.config_records.get(HE_RECORD)
        if (request.metadata.message_type == "train" and node == culprit
                and _round_of(request) == bad_round):
            key_dir = Path(str(he[SIMULATION_SECRET_KEY])).parent
            public = load_public_context(key_dir / PUBLIC_CONTEXT_FILENAME)
            assert he[FINGERPRINT_KEY] == public.fingerprint
            honest = encrypted_from_record(reply.content.array_records["arrays"])
            reply.content.array_records["arrays"] = encrypted_to_record(
                forge(public, honest, rng))
        return reply

    return hook


def _run(cfg, run_dir: Path, hook, num_nodes: int = NUM_CLIENTS):
    grid = InProcessGrid(client_app, num_nodes=num_nodes)
    grid.reply_hook = hook
    strategy = build_strategy(cfg, run_dir)
    model = build_model("tabular_mlp", (30,), 2, seed=int(cfg.seed))
    config = ConfigRecord({CONFIG_MESSAGE_KEY: config_to_yaml(cfg)})
    history = _History()
    with mock.patch.object(strategy, "configure_train",
                           wraps=strategy.configure_train) as configure:
        result = strategy.start(grid, ArrayRecord(model.state_dict()),
                                num_rounds=int(cfg.num_rounds), train_config=config,
                                evaluate_config=config, recorder=history)
    # The global model each round trained from (the mod replaces what it decrypts in place).
    history.trained_from = [call.args[1] for call in configure.call_args_list]
    return strategy, result, grid, history


def _group_checks(grid: InProcessGrid) -> list[tuple[int, list[int], list[int], int]]:
    """(tester, members, replies, summed terms) of every group test the server sent."""
    out = []
    for msg in grid.sent:
        he = msg.content.config_records.get(HE_RECORD)
        if he is None or he.get(CHECK_KEY) != CHECK_GROUP:
            continue
        encrypted, _ = model_from_record(msg.content.array_records["arrays"])
        out.append((msg.metadata.dst_node_id, json.loads(str(he[CHECK_MEMBERS_KEY])),
                    json.loads(str(he[CHECK_REPLIES_KEY])), encrypted.num_terms))
    return out


def _assert_testers_never_saw_one_reply(grid: InProcessGrid) -> int:
    checks = _group_checks(grid)
    by_tester: dict[int, list[list[int]]] = {}
    for tester, members, replies, terms in checks:
        assert terms == len(members) >= 2, (tester, members)
        assert tester not in members, (tester, members)
        by_tester.setdefault(tester, []).append(members)
        assert isolated_reply(tester, replies, by_tester[tester]) is None, (tester, members)
    return len(checks)


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_reply_is_rolled_back_traced_and_excluded(tmp_path, forgery):
    errors: list[Message] = []
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hook = _forging_hook(FORGERIES[forgery], CULPRIT, BAD_ROUND, errors)
    strategy, result, grid, history = _run(_cfg(tmp_path), run_dir, hook)
    (log1, model1), (log2, model2), (log3, model3) = history.rounds
    everyone = list(range(101, 101 + NUM_CLIENTS))
    honest = [n for n in everyone if n != CULPRIT]
    # Round 1 is fine and costs no extra exchange: evaluation verified the aggregate.
    assert log1["aborted"] is None and log1["aggregated"] == everyone
    assert log1["exchanges"] == 2
    # Round 2: the clients could not decrypt the aggregate and said so, with a fixed reason.
    undecryptable = [e for e in errors if e.error.code == HE_UNDECRYPTABLE_CODE]
    assert undecryptable and all(e.error.reason == UNDECRYPTABLE_REASON for e in undecryptable)
    rollback = log2["extra"]["he"]["rollback"]
    assert log2["aborted"] and "rolled back" in log2["aborted"]
    assert model2 is model1  # the round ended with round 1's model
    assert rollback["rolled_back_to_round"] == 1
    assert rollback["culprits"] == [CULPRIT] and rollback["outcome"] == "identified"
    assert rollback["undetermined"] == [] and rollback["contradicted"] == []
    assert log2["rejected"] == {str(CULPRIT): CULPRIT_REASON}
    assert log2["aggregated"] == [] and log2["evaluate_metrics"] == {}
    assert rollback["exchanges"] <= 2 and log2["exchanges"] <= 2 + 2
    assert _assert_testers_never_saw_one_reply(grid) == len(rollback["tests"]) > 0
    # Round 3 trains from round 1's model, without the culprit, and succeeds.
    train3 = [m for m in grid.sent if m.metadata.message_type == "train" and _round_of(m) == 3]
    assert sorted(m.metadata.dst_node_id for m in train3) == honest
    assert history.trained_from[2] is model1
    assert CULPRIT not in {m.metadata.dst_node_id for m in grid.sent
                           if _round_of(m) == 3}
    assert log3["aborted"] is None and log3["aggregated"] == honest
    assert result.arrays is model3 and strategy.failure is None
    secret = load_secret_context(run_dir / SIMULATION_KEY_DIR / SECRET_CONTEXT_FILENAME)
    final = decrypt_mean(secret, model_from_record(model3)[0], max_weight=MAX_WEIGHT,
                         max_abs_value=MAX_ABS)
    assert final.num_terms == len(honest)


def test_without_evaluation_one_check_exchange_verifies_each_aggregate(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hook = _forging_hook(forge_random, CULPRIT, BAD_ROUND, [])
    _, _, grid, history = _run(_cfg(tmp_path, "fraction_evaluate=0.0"), run_dir, hook)
    (log1, _), (log2, _), (log3, _) = history.rounds
    assert log1["aborted"] is None and log1["exchanges"] == 2  # train + verify
    assert "he_verify" in log1["seconds"]
    assert log2["extra"]["he"]["rollback"]["culprits"] == [CULPRIT]
    assert "he_search" in log2["seconds"]
    assert log3["aborted"] is None and CULPRIT not in log3["aggregated"]
    assert len(log3["aggregated"]) == NUM_CLIENTS - 1
    _assert_testers_never_saw_one_reply(grid)


def test_a_search_that_cannot_identify_anyone_fails_the_run(tmp_path):
    """Two replies: every group of >= 2 is the whole sum, so nobody can be traced."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hook = _forging_hook(forge_random, 102, 1, [])
    cfg = _cfg(tmp_path, "num_clients=2", "min_train_nodes=2", "min_evaluate_nodes=2")
    strategy, _, grid, history = _run(cfg, run_dir, hook, num_nodes=2)
    assert len(history.rounds) == 1  # the run stopped after round 1
    log1 = history.rounds[0][0]
    assert log1["aborted"] and log1["extra"]["he"]["rollback"]["outcome"] == "unresolved"
    assert strategy.failure and "could not identify" in strategy.failure
    assert not _group_checks(grid)  # no group was ever sent: none is allowed


def test_summary_lists_the_rolled_back_round_and_the_run_completes(tmp_path):
    from fedstack.outputs.recorder import RunRecorder

    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    grid = InProcessGrid(client_app, num_nodes=NUM_CLIENTS)
    grid.reply_hook = _forging_hook(forge_random, CULPRIT, BAD_ROUND, [])
    strategy = build_strategy(cfg, run_dir)
    recorder = RunRecorder(run_dir, cfg, title="he forgery")
    model = build_model("tabular_mlp", (30,), 2, seed=int(cfg.seed))
    config = ConfigRecord({CONFIG_MESSAGE_KEY: config_to_yaml(cfg)})
    strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=NUM_ROUNDS,
                   train_config=config, evaluate_config=config, recorder=recorder,
                   max_failed_rounds=0)
    summary = recorder.finish(strategy.stop_reason, failure=strategy.failure)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    # The culprit was found and excluded: the round is rolled back, not failed, and the
    # run goes on to complete.
    assert saved["rounds_rolled_back"] == [BAD_ROUND] and saved["rounds_failed"] == []
    assert saved["rounds_completed"] == NUM_ROUNDS - 1 and saved["status"] == "completed"
    assert "rolled back" in saved["failure_reasons"][str(BAD_ROUND)]
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    bad = next(r for r in history if r["round"] == BAD_ROUND)
    assert bad["extra"]["he"]["rollback"]["culprits"] == [CULPRIT]


# ------------------------------------------------------------ the clients' own rules


def test_client_refuses_groups_that_break_the_rules_before_decrypting(tmp_path):
    keys_main(["--out", str(tmp_path / "k")])
    secret_path = tmp_path / "k" / SECRET_CONTEXT_FILENAME
    secret = load_secret_context(secret_path)
    cfg = _cfg(tmp_path, "num_clients=5")
    settings = settings_of(cfg.aggregation)
    scale_bits = settings.effective_scale_bits()
    grid = InProcessGrid(client_app, num_nodes=5, node_config=lambda i: {
        "partition-id": i, "num-partitions": 5, "he-secret-context": str(secret_path)})
    replies = grid.node_ids  # 101..105
    model = build_model("tabular_mlp", (30,), 2, seed=0)
    layout = ArrayLayout.of(ArrayRecord(model.state_dict()))
    rng = np.random.default_rng(0)
    encrypted = {n: encrypt_update(secret, rng.normal(0, 0.1, layout.size), 20,
                                   scale_bits=scale_bits, max_abs_value=MAX_ABS,
                                   max_weight=MAX_WEIGHT) for n in replies}
    config = ConfigRecord({CONFIG_MESSAGE_KEY: config_to_yaml(cfg), "server-round": 1})

    def ask(tester: int, members: list[int], summed: list[int] | None = None) -> Message:
        total = aggregate(secret.public_only(), [encrypted[n] for n in summed or members],
                          scale_bits=scale_bits, max_terms=10)
        he = ConfigRecord({FINGERPRINT_KEY: secret.fingerprint, CHECK_KEY: CHECK_GROUP,
                           CHECK_ROUND_KEY: 1, CHECK_MEMBERS_KEY: json.dumps(members),
                           CHECK_REPLIES_KEY: json.dumps(replies)})
        msg = Message(RecordDict({"arrays": model_to_record(total, layout), "config": config,
                                  HE_RECORD: he}), dst_node_id=tester, message_type="evaluate")
        (reply,) = grid.send_and_receive([msg])
        return reply

    with mock.patch.object(he_mod_module, "decrypt_mean",
                           wraps=he_mod_module.decrypt_mean) as decrypted:
        refused = {
            "own reply": ask(101, [101, 102]),
            "one reply": ask(101, [102]),
            "mislabelled": ask(101, [102, 103, 104], summed=[102, 103]),
        }
        allowed = ask(101, [102, 103])
        # With {102, 103} seen, {102, 103, 104} would give 104 (and the total minus 101's
        # own reply minus that group would give 105).
        refused["isolates one"] = ask(101, [102, 103, 104])
        assert decrypted.call_count == 1
    for case, reply in refused.items():
        assert reply.has_error() and reply.error.code == HE_CHECK_REFUSED_CODE, case
    assert allowed.content.config_records[CHECK_REPLY_RECORD][CHECK_OK_KEY] is True
    # Another tester, the same group: fine (what one tester may see is per tester). But 105
    # may not have {102, 103, 104}: the total minus its own reply minus that group is 101.
    assert ask(105, [102, 103, 104]).error.code == HE_CHECK_REFUSED_CODE
    other = ask(105, [102, 103])
    assert other.content.config_records[CHECK_REPLY_RECORD][CHECK_OK_KEY] is True


# ------------------------------------------------------------ keys outside simulation


def test_server_refuses_to_generate_keys_outside_simulation(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = settings_of(cfg.aggregation)
    deployed = HttpGrid(insecure=True, token="not-used")
    assert is_deployment(deployed)
    assert not is_deployment(InProcessGrid(client_app, num_nodes=1))
    with pytest.raises(HEKeyError, match=r"aggregation\.public_context is not set"):
        check_server_key_source(settings, deployment=True)
    with pytest.raises(HEKeyError, match=r"aggregation\.public_context is not set"):
        server_keys(settings, run_dir, deployment=True)
    strategy = build_strategy(cfg, run_dir)
    model = build_model("tabular_mlp", (30,), 2, seed=0)
    with pytest.raises(HEKeyError, match=r"aggregation\.public_context is not set"):
        strategy.start(deployed, ArrayRecord(model.state_dict()), num_rounds=1)
    assert not (run_dir / SIMULATION_KEY_DIR).exists()
    # With the public file from `fedstack keys`, a deployment is fine.
    keys_main(["--out", str(tmp_path / "k")])
    public = tmp_path / "k" / PUBLIC_CONTEXT_FILENAME
    given = settings_of(_cfg(tmp_path, f"aggregation.public_context={public}").aggregation)
    check_server_key_source(given, deployment=True)
    assert server_keys(given, run_dir, deployment=True).public_path == public.resolve()
