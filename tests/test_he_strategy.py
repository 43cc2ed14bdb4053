"""HEFedAvg + he_mod through the real ClientApp in process (no Ray): fast end-to-end checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedstack.client_app import app as client_app
from fedstack.config import CONFIG_MESSAGE_KEY, compose_config, config_to_yaml
from fedstack.outputs.run_directory import load_checkpoint, save_checkpoint
from fedstack.strategies import build_strategy
from fedstack.strategies.he.ckks import decrypt_mean, encrypt_update
from fedstack.strategies.he.cli import decrypt_run, keys_main
from fedstack.strategies.he.keys import (
    PUBLIC_CONTEXT_FILENAME,
    SECRET_CONTEXT_FILENAME,
    PublicContext,
    load_secret_context,
)
from fedstack.strategies.he.provisioning import SIMULATION_KEY_DIR
from fedstack.strategies.he.records import (
    ENCRYPTED_MODEL_KEYS,
    encrypted_to_record,
    model_from_record,
)
from fedstack.task.models import build_model
from tests.inprocess_grid import InProcessGrid

NUM_CLIENTS = 4


def _cfg(tmp_path: Path, aggregation: str, *extra: str):
    return compose_config([
        "task=breast_cancer", f"aggregation={aggregation}", "partition=iid",
        f"num_clients={NUM_CLIENTS}", "num_rounds=2", f"output_dir={tmp_path}", *extra,
    ])  # later overrides win (e.g. num_clients)


def _run(cfg, run_dir: Path, rounds: int = 2, hook=None, node_config=None,
         num_nodes: int = NUM_CLIENTS):
    grid = InProcessGrid(client_app, num_nodes=num_nodes, node_config=node_config)
    grid.reply_hook = hook
    strategy = build_strategy(cfg, run_dir)
    model = build_model("tabular_mlp", (30,), 2, seed=int(cfg.seed))
    config = ConfigRecord({CONFIG_MESSAGE_KEY: config_to_yaml(cfg)})
    result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=rounds,
                            train_config=config, evaluate_config=config)
    return strategy, result, grid


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("he-runs")
    he_dir, plain_dir = base / "he", base / "plain"
    he_dir.mkdir()
    plain_dir.mkdir()
    seen: list[bytes] = []

    def record(node, request, reply):
        seen.append(b"".join(a.data for r in reply.content.array_records.values()
                             for a in r.values()) if not reply.has_error() else b"")
        return reply

    from unittest import mock

    import fedstack.strategies.he.mod as he_mod_module

    with mock.patch.object(he_mod_module, "decrypt_mean",
                           wraps=he_mod_module.decrypt_mean) as counted:
        he = _run(_cfg(base, "he"), he_dir, hook=record)
    # Aggregate 1 serves evaluate(1) and train(2) but is decrypted once per node.
    assert counted.call_count == 2 * NUM_CLIENTS
    plain = _run(_cfg(base, "fedavg"), plain_dir)
    return he, plain, he_dir, seen


def test_decrypted_he_model_equals_plain_fedavg(runs):
    (strategy, result, _), (_, plain_result, _), he_dir, _ = runs
    assert sorted(result.arrays.keys()) == sorted(ENCRYPTED_MODEL_KEYS)
    secret = load_secret_context(he_dir / SIMULATION_KEY_DIR / SECRET_CONTEXT_FILENAME)
    encrypted, layout = model_from_record(result.arrays)
    decrypted = layout.unflatten(decrypt_mean(secret, encrypted).mean)
    for name in plain_result.arrays:
        np.testing.assert_allclose(decrypted[name].numpy(), plain_result.arrays[name].numpy(),
                                   rtol=0, atol=1e-5)
    # Federated evaluation ran on decrypted models and agrees with plain FedAvg's.
    he_acc = result.evaluate_metrics_clientapp[2]["eval-accuracy"]
    assert he_acc == pytest.approx(plain_result.evaluate_metrics_clientapp[2]["eval-accuracy"])
    assert strategy.round_log.extra["he"]["summed"] == NUM_CLIENTS


def test_server_holds_public_context_only_and_never_sees_the_secret_key(runs):
    (strategy, _, grid), _, he_dir, replies = runs
    assert type(strategy.keys.context) is PublicContext
    assert not strategy.server_sees_model
    assert strategy.keys.one_process_held_both
    assert any("one process" in n or "both" in n for n in strategy.privacy_notes)
    secret = load_secret_context(he_dir / SIMULATION_KEY_DIR / SECRET_CONTEXT_FILENAME)
    probe = secret.secret_key_bytes[-64:]
    sent = [b"".join(a.data for r in m.content.array_records.values() for a in r.values())
            for m in grid.sent]
    assert all(probe not in blob for blob in sent + replies)
    public_file = (he_dir / SIMULATION_KEY_DIR / PUBLIC_CONTEXT_FILENAME).read_bytes()
    assert probe not in public_file
    # Only ciphertexts travel up: no plaintext model array in any train reply.
    assert all(b"he.blob" not in blob for blob in replies)  # keys are not data
    assert len(replies) == 2 * 2 * NUM_CLIENTS


def _tamper_hook(other_key_ctx):
    """Each of the first four nodes corrupts its encrypted reply in its own way."""

    def hook(node, request, reply):
        if request.metadata.message_type != "train" or reply.has_error():
            return reply
        arrays = reply.content.array_records["arrays"]
        if node == 101:  # one bit flipped in transit
            blob = arrays["he.blob"].numpy().copy()
            blob[len(blob) // 2] ^= 0x40
            arrays["he.blob"] = Array(blob)
        elif node == 102:  # a ciphertext missing (header and digest made consistent)
            meta = json.loads(arrays["he.meta"].numpy().tobytes())
            lengths = arrays["he.lengths"].numpy()[:-1].copy()
            blob = arrays["he.blob"].numpy()[: int(lengths.sum())].copy()
            meta.update(count=len(lengths), digest=hashlib.sha256(blob.tobytes()).hexdigest())
            arrays["he.meta"] = Array(np.frombuffer(json.dumps(meta).encode(), np.uint8).copy())
            arrays["he.lengths"] = Array(lengths)
            arrays["he.blob"] = Array(blob)
        elif node == 103:  # encrypted under another key
            meta = json.loads(arrays["he.meta"].numpy().tobytes())
            fake = encrypt_update(other_key_ctx, np.zeros(meta["dim"]), 5,
                                  scale_bits=meta["scale_bits"], max_abs_value=1,
                                  max_weight=10)
            reply.content.array_records["arrays"] = encrypted_to_record(fake)
        elif node == 104:  # a plaintext model instead of ciphertexts
            reply.content.array_records["arrays"] = ArrayRecord(
                {"w": Array(np.zeros(3, np.float32))})
        return reply

    return hook


def test_bad_replies_are_dropped_with_reasons_and_the_round_goes_on(tmp_path):
    keys_main(["--out", str(tmp_path / "k")])
    other_secret = str(tmp_path / "k" / SECRET_CONTEXT_FILENAME)
    n = 6

    def node_config(i):
        cfg = {"partition-id": i, "num-partitions": n}
        if i == 4:  # node 105 was provisioned with another key
            cfg["he-secret-context"] = other_secret
        return cfg

    cfg = _cfg(tmp_path, "he", f"num_clients={n}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hook = _tamper_hook(load_secret_context(other_secret))
    strategy, result, _grid = _run(cfg, run_dir, rounds=1, hook=hook, node_config=node_config,
                                  num_nodes=n)
    rejected = strategy.round_log.rejected
    expected = {101: "digest", 102: "ciphertexts, expected", 103: "another key",
                104: "expected arrays", 105: "this node holds"}
    assert sorted(rejected) == sorted(expected)
    for node, reason in expected.items():
        assert reason in rejected[node], (node, rejected[node])
    assert strategy.round_log.aggregated == [106]
    secret = load_secret_context(run_dir / SIMULATION_KEY_DIR / SECRET_CONTEXT_FILENAME)
    encrypted, _ = model_from_record(result.arrays)
    res = decrypt_mean(secret, encrypted)
    assert res.num_terms == 1
    assert res.total_weight == strategy.round_log.client_metrics[106]["num-examples"]


def test_deployment_paths_and_checkpoint_decrypt(tmp_path):
    """Keys from `fedstack keys`; server gets the public path, nodes their secret path."""
    key_dir = tmp_path / "keys"
    assert keys_main(["--out", str(key_dir), "--preset", "compact"]) == 0
    cfg = _cfg(tmp_path, "he", "aggregation.preset=compact",
               f"aggregation.public_context={key_dir / PUBLIC_CONTEXT_FILENAME}")
    secret_path = str(key_dir / SECRET_CONTEXT_FILENAME)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    strategy, result, grid = _run(
        cfg, run_dir, rounds=1,
        node_config=lambda i: {"partition-id": i, "num-partitions": NUM_CLIENTS,
                               "he-secret-context": secret_path},
    )
    assert not strategy.keys.one_process_held_both
    assert not (run_dir / SIMULATION_KEY_DIR).exists()
    assert len(strategy.round_log.aggregated) == NUM_CLIENTS
    # No simulation hint is sent when the server was given a public context.
    assert all("simulation-secret-context" not in m.content.config_records["he"]
               for m in grid.sent)
    # The checkpoint is ciphertext; `fedstack decrypt` recovers the model from it.
    save_checkpoint(run_dir, 1, result.arrays)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    stored = load_checkpoint(run_dir / "checkpoints" / "round-0001.npz")
    assert sorted(stored.keys()) == sorted(ENCRYPTED_MODEL_KEYS)
    info = decrypt_run(run_dir, secret_path, tmp_path / "plain.npz")
    plain = load_checkpoint(Path(info["out"]))
    encrypted, layout = model_from_record(result.arrays)
    direct = layout.unflatten(decrypt_mean(load_secret_context(secret_path), encrypted).mean)
    for name in direct:
        np.testing.assert_array_equal(plain[name].numpy(), direct[name].numpy())
    assert info["clients_summed"] == NUM_CLIENTS and info["round"] == 1


def test_resume_continues_from_the_encrypted_checkpoint(tmp_path):
    """Round 2 of a resumed run starts from round 1's ciphertext checkpoint and the same keys."""
    import json as _json

    from fedstack.server_app import run_server

    cfg = _cfg(tmp_path, "he", "run_name=resumable")
    first = run_server(InProcessGrid(client_app, num_nodes=NUM_CLIENTS), cfg)
    run_dir = Path(first["run_dir"]) if "run_dir" in first else tmp_path / "resumable"
    ckpt_dir = run_dir / "checkpoints"
    final_before = load_checkpoint(ckpt_dir / "round-0002.npz")
    # Pretend the run stopped after round 1.
    (ckpt_dir / "round-0002.npz").unlink()
    (ckpt_dir / "latest.json").write_text(_json.dumps({"round": 1, "file": "round-0001.npz"}))
    keys_before = (run_dir / SIMULATION_KEY_DIR / PUBLIC_CONTEXT_FILENAME).read_bytes()
    resumed_cfg = compose_config([
        "task=breast_cancer", "aggregation=he", f"output_dir={tmp_path}", f"resume={run_dir}",
    ])
    run_server(InProcessGrid(client_app, num_nodes=NUM_CLIENTS), resumed_cfg)
    assert (run_dir / SIMULATION_KEY_DIR / PUBLIC_CONTEXT_FILENAME).read_bytes() == keys_before
    final_after = load_checkpoint(ckpt_dir / "round-0002.npz")
    secret = load_secret_context(run_dir / SIMULATION_KEY_DIR / SECRET_CONTEXT_FILENAME)
    before = decrypt_mean(secret, model_from_record(final_before)[0]).mean
    after = decrypt_mean(secret, model_from_record(final_after)[0]).mean
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)
