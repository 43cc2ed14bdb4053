"""Deployment end to end: one SuperLink and three SuperNodes as real processes, over TLS with
SuperNode authentication, driven by `flwr run . CONNECTION --stream` (fedstack.deploy.local).

One deployment serves the whole module (start-up and key registration are paid once). Each
exchange costs ~20-30 s here (3 s polls on both sides and a fresh ClientApp process per
message on 2 cores), so runs are tiny: breast_cancer, 3 clients, 2 rounds, and federated
evaluation only where the server cannot evaluate (HE).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedstack.deploy.fault_injection import fault_app_dir
from fedstack.deploy.local import REPO_ROOT, LocalDeployment, RunResult, venv_bin

pytestmark = pytest.mark.e2e

NUM_NODES = 3
#: Overrides shared by every run: tiny task, short timeouts, central evaluation only.
BASE_RUN = {"task": "breast_cancer", "partition": "iid"}
BASE_OVERRIDES = ["num_clients=3", "num_rounds=2", "min_train_nodes=2", "min_evaluate_nodes=2",
                  "round_timeout=90", "fraction_evaluate=0", "log_table=true"]
#: Chance level of breast_cancer is ~0.63 (majority class); a working run reaches > 0.9.
GOOD_ACCURACY = 0.85
#: Under dp=local the noise comes from a secret seed, so runs are not reproducible: 2 noisy
#: rounds gave 0.92-0.96 in 12 in-process runs; one noisy round alone gives 0.77-0.90.
GOOD_DP_ACCURACY = 0.80
#: Budget slack for the crash test. The SuperLink may die after the clients have already
#: trained round 2 (the kill fires on round 1's log line), which spends their ε. The resumed
#: run trains round 2 again and spends it again; with max_epsilon at the target (8, planned
#: for 2 rounds), every client would rightly decline that re-run and the run would end on
#: round 1's model (seen once in CI: accuracy 0.728). Three rounds' worth of ε is ~9.6.
CRASH_TEST_MAX_EPSILON = 12.0
#: A table row of the run log for a finished round: "...      1 |     0.3363 | ...".
ROUND_ROW = re.compile(r"\s(\d+) \|\s+[-\d.]+ \|")


def layer_available(*paths: str) -> bool:
    return all((REPO_ROOT / p).exists() for p in paths)


SECAGG_READY = layer_available("fedstack/strategies/secagg/strategy.py",
                               "fedstack/strategies/secagg/mod.py")
HE_READY = layer_available("fedstack/strategies/he/strategy.py", "fedstack/strategies/he/mod.py",
                           "fedstack/strategies/he/cli.py")
DP_READY = layer_available("fedstack/privacy/ledger.py", "fedstack/privacy/local_trainer.py")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    work = tmp_path_factory.mktemp("deploy")
    node_config: dict[int, dict[str, str | int]] = {}
    for i in range(NUM_NODES):
        fault_file = work / f"fault-{i}"
        fault_file.write_text("none")
        # min-cohort=2: these three data owners accept a sum of two survivors, so that a
        # round can complete after one SuperNode dies (the default policy needs 3).
        node_config[i] = {"fedstack-fault-file": str(fault_file), "min-cohort": 2}
    if HE_READY:
        keys = work / "he-keys"
        proc = subprocess.run([str(venv_bin() / "fedstack"), "keys", "--out", str(keys)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for i in range(NUM_NODES):
            node_config[i]["he-secret-context"] = str(keys / "he_secret.ckks")
    with LocalDeployment(work, num_supernodes=NUM_NODES, node_config=node_config) as dep:
        dep.wait_for_nodes(NUM_NODES)
        yield dep


def _explain(result: RunResult) -> str:
    return f"exit {result.returncode} after {result.seconds:.0f} s\n{result.log[-4000:]}"


def _assert_learned(result: RunResult, rounds: int = 2) -> dict:
    assert result.summary is not None, _explain(result)
    summary = result.summary
    assert summary["rounds_completed"] == rounds, summary
    bar = GOOD_DP_ACCURACY if summary.get("dp") == "local" else GOOD_ACCURACY
    assert summary["final_accuracy"] is not None and summary["final_accuracy"] > bar, summary
    return summary


def _kill_when_round_done(done_round: int, action: Callable[[], None]
                          ) -> tuple[Callable[[str], None], threading.Event]:
    """An `on_line` hook that runs `action` once the run log shows round `done_round`."""
    fired = threading.Event()

    def on_line(line: str) -> None:
        match = ROUND_ROW.search(line)
        if match and int(match.group(1)) == done_round and not fired.is_set():
            fired.set()
            action()

    return on_line, fired


def _run_with_faults(deployment: LocalDeployment, tmp_path: Path, faults: dict[int, str],
                     run_config: dict[str, str], overrides: list[str], run_name: str
                     ) -> RunResult:
    """One run of the fault-injecting test ClientApp with `faults` {node index: kind}."""
    for index, kind in faults.items():
        (deployment.work_dir / f"fault-{index}").write_text(kind)
    try:
        deployment.app_dir = fault_app_dir(REPO_ROOT, tmp_path / "fault-app")
        return deployment.run(run_config, overrides, run_name=run_name)
    finally:
        deployment.app_dir = REPO_ROOT
        for index in faults:
            (deployment.work_dir / f"fault-{index}").write_text("none")


def test_fedavg_over_tls_with_node_auth(deployment: LocalDeployment) -> None:
    result = deployment.run({**BASE_RUN, "aggregation": "fedavg"}, BASE_OVERRIDES,
                            run_name="fedavg")
    summary = _assert_learned(result)
    assert summary["aggregation"] == "fedavg"
    rows = [r for r in result.history if r["round"] >= 1]
    assert [len(r["aggregated"]) for r in rows] == [3, 3]
    # The three node ids are the registered SuperNodes', and nothing was rejected.
    registered = {spec.node_id for spec in deployment.supernodes.values()}
    assert set(rows[-1]["aggregated"]) == registered
    assert all(not r["rejected"] for r in rows)


@pytest.mark.skipif(not SECAGG_READY, reason="secure aggregation layer not installed")
def test_secagg_round_completes_after_a_supernode_is_killed(
        deployment: LocalDeployment) -> None:
    """Fault 1: SuperNode 2 dies after round 1 (its keys and shares for round 2 are already
    out, pipelined): round 2 completes from the two survivors by unmasking its shares."""
    victim = deployment.supernodes[2]
    on_line, fired = _kill_when_round_done(1, lambda: deployment.kill_supernode(2))
    try:
        result = deployment.run(
            {**BASE_RUN, "aggregation": "secagg"},
            [*BASE_OVERRIDES, "round_timeout=45", "aggregation.stage_timeout=45"],
            run_name="secagg-kill", on_line=on_line)
    finally:
        if not victim.process or not victim.process.alive():
            deployment.start_supernode(2)
    assert fired.is_set(), _explain(result)
    summary = _assert_learned(result)
    assert summary["aggregation"] == "secagg" and not summary["rounds_failed"]
    round1, round2 = (r for r in result.history if r["round"] >= 1)
    assert len(round1["aggregated"]) == 3
    assert victim.node_id not in round2["aggregated"] and len(round2["aggregated"]) == 2
    facts = round2["extra"]["secagg"]
    assert facts["dropped"] == [victim.node_id] and facts["survivors"] == 2, facts
    assert facts["shared"] == 3  # it had shared its secrets before it died: recovered
    # Depending on when its heartbeat lapses, Flower answers for the dead node with an error
    # reply (code 5) or the exchange times out: either way it is simply missing.
    deployment.wait_for_nodes(NUM_NODES, timeout=90)


@pytest.mark.skipif(not HE_READY, reason="HE layer not installed")
def test_he_over_tls_with_node_auth_rejects_garbage_ciphertext(
        deployment: LocalDeployment, tmp_path: Path) -> None:
    """CKKS: each SuperNode reads its secret context from its node config, the server only
    the public one; the accuracy comes from the clients' (decrypted) evaluation.
    Fault 3 (ciphertext part): SuperNode 2 replaces its encrypted update by random bytes of
    the same size every round; the server rejects it and averages the other two."""
    keys = deployment.work_dir / "he-keys"
    result = _run_with_faults(
        deployment, tmp_path, {2: "garbage"},
        {**BASE_RUN, "aggregation": "he"},
        [*BASE_OVERRIDES, "fraction_evaluate=1.0",
         f"aggregation.public_context={keys / 'he_public.ckks'}"],
        run_name="he")
    summary = _assert_learned(result)
    assert summary["aggregation"] == "he"
    assert summary["final_accuracy_source"] != "central"
    garbage = deployment.supernodes[2].node_id
    rows = [r for r in result.history if r["round"] >= 1]
    assert len(rows) == 2
    for row in rows:
        assert len(row["aggregated"]) == 2 and garbage not in row["aggregated"], row
        assert set(map(int, row["rejected"])) == {garbage}, row
        assert row.get("central_accuracy") is None


@pytest.mark.skipif(not (SECAGG_READY and DP_READY), reason="secagg or DP layer not installed")
def test_secagg_dp_resumes_after_superlink_crash(deployment: LocalDeployment) -> None:
    """Fault 2: the SuperLink (with its ServerApp) is killed after round 1; a restarted
    SuperLink on the same database resumes the run from the checkpoint, DP ledger intact."""
    run_config = {**BASE_RUN, "aggregation": "secagg", "dp": "local"}
    on_line, fired = _kill_when_round_done(1, deployment.kill_superlink)
    first = deployment.run(run_config,
                           [*BASE_OVERRIDES, "dp.sample_rate=0.125",
                            f"dp.max_epsilon={CRASH_TEST_MAX_EPSILON}"],
                           run_name="secagg-dp", timeout=400, on_line=on_line)
    assert fired.is_set(), _explain(first)
    run_dir = deployment.outputs_dir / "secagg-dp"
    assert first.summary is None  # the crash left no summary
    assert (run_dir / "checkpoints" / "round-0001.npz").exists()
    ledger_before = json.loads((run_dir / "privacy.json").read_text())
    eps_round1 = {e["client"]: e["epsilon"] for e in ledger_before["entries"]
                  if e["server_round"] == 1}
    assert len(eps_round1) == 3 and all(v and v > 0 for v in eps_round1.values())

    deployment.start_superlink()
    deployment.wait_for_nodes(NUM_NODES, timeout=120)
    resumed = deployment.run(run_config, [f"resume={run_dir}"], timeout=400)
    summary = _assert_learned(resumed)
    assert summary["dp"] == "local" and summary["aggregation"] == "secagg"
    assert summary["epsilon_max"] is not None and summary["epsilon_max"] > 0
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in history] == [0, 1, 2]  # round 1 kept, not re-run
    ledger = json.loads((run_dir / "privacy.json").read_text())
    kept = {e["client"]: e["epsilon"] for e in ledger["entries"] if e["server_round"] == 1}
    assert kept == eps_round1
    eps_round2 = {e["client"]: e["epsilon"] for e in ledger["entries"]
                  if e["server_round"] == 2}
    assert eps_round2, ledger
    # epsilon accumulates over the whole run, across the restart: a client that trained in
    # rounds 1 and 2 has spent strictly more than after round 1 (a client whose accountant
    # restarted with the resumed Flower run would report round 1's value again).
    for client, eps in eps_round2.items():
        assert eps > eps_round1[client], (client, eps, eps_round1[client])


def test_malformed_updates_are_rejected_and_the_run_continues(
        deployment: LocalDeployment, tmp_path: Path) -> None:
    """Fault 3: SuperNode 1 sends NaN weights, SuperNode 2 arrays of the wrong shape (a
    test ClientApp that tampers after the real handler); both are rejected and the model is
    averaged from SuperNode 0 alone."""
    result = _run_with_faults(deployment, tmp_path, {1: "nan", 2: "shape"},
                              {**BASE_RUN, "aggregation": "fedavg"},
                              [*BASE_OVERRIDES, "num_rounds=1"], run_name="malformed")
    summary = _assert_learned(result, rounds=1)
    good = deployment.supernodes[0].node_id
    nan_node, shape_node = deployment.supernodes[1].node_id, deployment.supernodes[2].node_id
    (row,) = (r for r in result.history if r["round"] >= 1)
    assert row["aggregated"] == [good], row
    rejected = {int(k): v for k, v in row["rejected"].items()}
    assert set(rejected) == {nan_node, shape_node}, row
    assert "nan" in rejected[nan_node].lower() or "finite" in rejected[nan_node].lower()
    assert "shape" in rejected[shape_node].lower()
    assert summary["rounds_failed"] == []


def test_unregistered_or_plaintext_supernodes_cannot_join(
        deployment: LocalDeployment) -> None:
    """Fault 4: SuperNodes with an unregistered key, without a key, or speaking plaintext to
    the TLS SuperLink (with a registered key, or without a key) never come online."""
    before = {int(n["node-id"]) for n in deployment.wait_for_nodes(NUM_NODES)}
    node_config = {"partition-id": 0, "num-partitions": NUM_NODES}
    intruders = [
        deployment.add_supernode(10, node_config, register=False),
        deployment.add_supernode(11, node_config, with_key=False),
        deployment.add_supernode(12, node_config, tls=False),  # Flower itself refuses
        deployment.add_supernode(13, node_config, tls=False, with_key=False),
    ]
    try:
        # Wait until each intruder was turned away (a failed attempt or an exit), then a bit
        # longer in case one of them would still get in.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(
                spec.process is not None and (not spec.process.alive() or re.search(
                    r"failed|Exit Code", spec.process.log_tail(20000)))
                for spec in intruders):
            time.sleep(1)
        time.sleep(3)
        online = [n for n in deployment.connected_nodes() if n["status"] == "online"]
        ids = {int(n["node-id"]) for n in online}
        assert ids == before, online
        assert intruders[2].node_id is not None and intruders[2].node_id not in ids
        for spec in intruders:
            log = spec.process.log_tail(6000) if spec.process else ""
            assert "SuperNode ID:" not in log, log
    finally:
        for spec in intruders:
            deployment.kill_supernode(spec.index)
