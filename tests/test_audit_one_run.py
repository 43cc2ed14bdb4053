"""One-run DP auditing: the bound's math, the canaries, and the audit against our DP-SGD.

The last two tests train with the real DP engine (`fedstack.privacy.engine.LocalDP`, `bk`
clipping, Poisson sampling, RDP accountant): an honest run's empirical ε stays below the
accountant's, and a run whose noise is switched off while the accountant still counts
σ = 1 (the test-only lie, injected by monkeypatching the noise draw) fails the audit.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from fedstack.audit.canaries import (
    CanaryPlan,
    inclusion_bits,
    insert_canaries,
    make_canaries,
)
from fedstack.audit.one_run import (
    audit_scores,
    correct_guess_rate,
    count_correct,
    epsilon_lower_bound,
    guesses_from_scores,
    p_value,
    verdict,
)
from fedstack.privacy import secure_random
from fedstack.privacy.engine import LocalDP
from fedstack.privacy.settings import LocalDPSettings
from fedstack.task.contract import Partition
from fedstack.task.training import to_dataset


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# --------------------------------------------------------------------------- bound math
@pytest.mark.parametrize(("r", "v", "eps"), [(10, 7, 0.5), (100, 80, 1.3), (37, 37, 2.0)])
def test_pure_dp_p_value_is_the_binomial_tail(r: int, v: int, eps: float) -> None:
    q = math.exp(eps) / (1 + math.exp(eps))
    want = sum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1))
    assert p_value(500, r, v, eps, 0.0) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(("r", "beta"), [(10, 0.05), (50, 0.01), (200, 0.05)])
def test_pure_dp_bound_with_all_guesses_right_is_closed_form(r: int, beta: float) -> None:
    # P[Bin(r, q) >= r] = q^r = beta  <=>  q = beta^(1/r), eps = logit(q).
    assert epsilon_lower_bound(r, r, r, 0.0, beta) == pytest.approx(
        _logit(beta ** (1 / r)), abs=1e-5)


def test_delta_term_of_one_guess_is_closed_form() -> None:
    # r = v = 1: f(1) = q and max_i (f(1-i) - f(1)) / i = 1 - q, so the p-value is
    # q + 2 m delta (1 - q) = beta  <=>  q = (beta - 2 m delta) / (1 - 2 m delta).
    m, delta, beta = 10, 0.01, 0.8
    q = (beta - 2 * m * delta) / (1 - 2 * m * delta)
    assert epsilon_lower_bound(m, 1, 1, delta, beta) == pytest.approx(_logit(q), abs=1e-5)
    assert _logit(q) == pytest.approx(math.log(3))


def test_delta_weakens_the_bound_and_chance_gives_nothing() -> None:
    bounds = [epsilon_lower_bound(1000, 200, 180, d, 0.05) for d in (0.0, 1e-6, 1e-4, 1e-3)]
    assert bounds[0] > 1.5 and all(a >= b for a, b in itertools.pairwise(bounds))
    assert bounds[-1] < bounds[0]
    assert epsilon_lower_bound(1000, 200, 100, 0.0, 0.05) == 0.0
    assert p_value(1000, 200, 100, 0.0, 0.0) > 0.05


def test_bound_holds_for_randomized_response() -> None:
    """An ε0-DP mechanism (randomized response on each canary's bit) must exceed ε0 in at
    most a β share of runs; the bound must also be informative (well above 0)."""
    eps0, m, beta, runs = 1.0, 200, 0.05, 200
    rng = np.random.default_rng(1)
    correct = rng.random((runs, m)) < correct_guess_rate(eps0)  # each guess right w.p. q
    bounds = np.array([epsilon_lower_bound(m, m, int(c.sum()), 0.0, beta) for c in correct])
    exceed = int((bounds > eps0).sum())
    assert exceed <= stats.binom.ppf(0.999, runs, beta)  # <= beta share, up to sampling
    assert np.median(bounds) > 0.5 * eps0


def test_guesses_abstain_in_the_middle() -> None:
    scores = np.array([0.1, 5.0, -3.0, 2.0, 0.0])
    guesses = guesses_from_scores(scores, k_in=2, k_out=1)
    assert guesses.tolist() == [0, 1, -1, 1, 0]
    assert count_correct(guesses, np.array([1, 1, 0, 0, 1], bool)) == (3, 2)
    with pytest.raises(ValueError, match="guesses about 5 canaries"):
        guesses_from_scores(scores, 3, 3)


def test_audit_uses_bonferroni_and_verdict_fails_loudly() -> None:
    included = inclusion_bits(bytes(range(32)), 400)
    scores = np.where(included, 1.0, -1.0) + np.linspace(0, 0.1, 400)  # a perfect attack
    audit = audit_scores(scores, included, delta=1e-5)
    # About half are in, so the largest all-correct candidate (30% in, 30% out) wins.
    assert (audit.k_in, audit.k_out, audit.r, audit.v) == (120, 120, 240, 240)
    assert audit.candidates == 8 and audit.num_included == int(included.sum())
    # Every candidate is tested at beta / 8: the bound is that of one test at 0.05 / 8.
    assert audit.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(400, 240, 240, 1e-5, 0.05 / 8), abs=1e-9)
    assert audit.epsilon_lower_bound < epsilon_lower_bound(400, 240, 240, 1e-5, 0.05)
    failed = verdict(audit, claimed_epsilon=1.0)
    assert not failed.passed and "AUDIT FAILED" in failed.message
    assert verdict(audit, claimed_epsilon=10.0).passed


# --------------------------------------------------------------------------- canaries
def test_canary_plan_is_the_secret_and_insertion_follows_it() -> None:
    plan = CanaryPlan.create(200, "ood", holder_clients=[0, 2], content_seed=5)
    bits = plan.included
    assert 70 < bits.sum() < 130  # fair coins
    again = CanaryPlan.from_json(plan.to_json())
    assert np.array_equal(again.included, bits)
    tampered = plan.to_json()
    tampered["included"][0] = not tampered["included"][0]
    with pytest.raises(ValueError, match="do not match the key"):
        CanaryPlan.from_json(tampered)
    canaries = make_canaries("ood", 200, 10, 5, input_shape=(1, 8, 8))
    x, y = np.zeros((30, 1, 8, 8), np.float32), np.zeros(30, np.int64)
    part = insert_canaries(Partition((x, y), (x[:3], y[:3])), plan, canaries, 2)
    mine = plan.indices_of(2)
    assert len(mine) == int((bits & (np.asarray(plan.holders) == 2)).sum())
    assert np.array_equal(part.train[0][30:], canaries.inputs[mine])
    assert len(part.val[1]) == 3  # validation untouched
    assert insert_canaries(Partition((x, y), (x, y)), plan, canaries, 1).train[0] is x


def test_mislabelled_canaries_are_always_wrong() -> None:
    source_y = np.arange(50) % 10
    canaries = make_canaries("mislabelled", 40, 10, 3, source_inputs=np.zeros((50, 4)),
                             source_labels=source_y)
    assert len(canaries) == 40 and canaries.inputs.dtype == np.float32
    rng = np.random.default_rng((3, 40))
    assert not np.any(canaries.labels == source_y[rng.permutation(50)[:40]])


# --------------------------------------------------------------------------- against DP-SGD
#: A linear model on d-dimensional inputs: random canaries are nearly orthogonal to each
#: other and to the data, so an unnoised run memorises every included one; 6 epochs at
#: batch 4 sample each included canary ~6 times (all but e^-6 of them at least once).
DIM, DATA, CANARIES, BATCH, EPOCHS, SIGMA, DELTA = 1024, 100, 400, 4, 6, 1.0, 1e-5


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """One torch thread: these steps are tiny, and on a loaded 2-core machine a second
    thread costs far more in contention than it gains (measured 5-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dp_run(monkeypatch: pytest.MonkeyPatch, *, noise_scale: float) -> tuple[float, object]:
    """(accountant's ε, audit) of one DP-SGD run on data + included canaries."""
    if noise_scale != 1.0:  # the lie: the accountant counts sigma, the noise is scaled down
        honest = secure_random.TorchRandom.normal_
        monkeypatch.setattr(secure_random.TorchRandom, "normal_",
                            lambda self, out, std: honest(self, out, std * noise_scale))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, DIM))
    y = rng.integers(0, 10, DATA)
    x = ((centres[y] + rng.normal(size=(DATA, DIM))) / math.sqrt(DIM)).astype(np.float32)
    canaries = make_canaries("ood", CANARIES, 10, 3, input_shape=(DIM,), value_range=(-1, 1))
    plan = CanaryPlan.create(CANARIES, "ood", holder_clients=[0], content_seed=3)
    train = insert_canaries(Partition((x, y), None), plan, canaries, 0).train
    data = to_dataset(*train)
    settings = LocalDPSettings(noise_multiplier=SIGMA, target_epsilon=None, delta=DELTA)
    dp = LocalDP(settings, num_examples=len(data), batch_size=BATCH, local_epochs=EPOCHS,
                 planned_rounds=1)
    torch.manual_seed(0)
    model = nn.Linear(DIM, 10)
    private = dp.make_private(model, lambda p: torch.optim.SGD(p, lr=1.0), data,
                              allow_model_fix=False)
    for _ in range(EPOCHS):
        private.train_epoch()
    claimed = dp.end_round(private, 1)["epsilon"]
    with torch.no_grad():
        losses = nn.functional.cross_entropy(
            model(torch.from_numpy(canaries.inputs)), torch.from_numpy(canaries.labels),
            reduction="none").numpy()
    return claimed, audit_scores(-losses, plan.included, delta=DELTA)


def test_honest_dp_run_stays_below_the_accountant(monkeypatch: pytest.MonkeyPatch) -> None:
    claimed, audit = _dp_run(monkeypatch, noise_scale=1.0)
    assert 1.5 < claimed < 3  # sigma = 1 at q ~ 1/75 over ~450 steps
    assert audit.epsilon_lower_bound <= claimed
    assert verdict(audit, claimed).passed


def test_lying_accountant_fails_the_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    claimed, audit = _dp_run(monkeypatch, noise_scale=1e-6)
    assert 1.5 < claimed < 3  # the accountant still reports sigma = 1
    assert audit.epsilon_lower_bound > claimed + 1.0
    result = verdict(audit, claimed)
    assert not result.passed and "AUDIT FAILED" in result.message


# --------------------------------------------------------------------------- a whole run
def test_audit_of_a_federated_run_catches_the_lying_accountant(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The real ServerApp and ClientApp (in-process grid), canaries inserted on the clients
    through the partition hook, the server's view of the round recorded: `audit_one_run`
    reads the accountant's ε from the run directory and must fail the run whose noise was
    switched off, from the final model and from the server's view."""
    import fedstack.client_app as client_module
    from fedstack.audit.canaries import load_plan
    from fedstack.audit.one_run import audit_one_run
    from fedstack.config import compose_config
    from fedstack.server_app import run_server
    from tests.inprocess_grid import InProcessGrid

    monkeypatch.setenv("FEDSTACK_DP_STATE_DIR", str(tmp_path / "node-disk"))
    honest = secure_random.TorchRandom.normal_
    monkeypatch.setattr(secure_random.TorchRandom, "normal_",
                        lambda self, out, std: honest(self, out, std * 1e-6))
    # 768-dimensional generated images and a linear model: canaries far apart (see DIM).
    cfg = compose_config([
        "task=synthetic_cifar", "task.image_size=16", "task.num_samples=300",
        "task.model=digits_linear", "task.batch_size=4", "task.local_epochs=3",
        "task.learning_rate=1.0", "task.momentum=0", "partition=iid", "num_clients=2",
        "min_train_nodes=2", "num_rounds=1", "central_evaluation=false",
        "fraction_evaluate=0", "min_evaluate_nodes=0", "log_table=false",
        "dp=local", "dp.noise_multiplier=1.0", "dp.target_epsilon=null", "dp.delta=1e-5",
        "audit.record_round=1", "audit.canaries=400", "audit.canary_kind=ood",
        "audit.canary_holders=[0,1]", f"output_dir={tmp_path}", "run_name=r"])
    # The server draws the canaries' key when it creates the run and keeps the plan in the
    # run directory; each client's ClientApp puts its included canaries into its data.
    summary = run_server(InProcessGrid(client_module.app, 2), cfg)
    assert summary["status"] == "completed"
    run_dir = Path(summary["run_dir"])
    plan = load_plan(run_dir)
    assert plan.m == 400 and set(plan.holders) == {0, 1}
    saved = (run_dir / "config.yaml").read_text()
    assert "canary_key" in saved and "canary_key: null" not in saved
    assert "Audit canaries were in" in (run_dir / "privacy_report.md").read_text()
    audit = audit_one_run(summary["run_dir"], cfg)
    claimed = audit["claimed_epsilon"]
    assert claimed == pytest.approx(max(summary["epsilon_per_client"].values()))
    assert 1.5 < claimed < 3 and audit["delta"] == 1e-5
    assert audit["passed"] is False
    assert audit["server_view"]["epsilon_lower_bound"] > claimed + 0.5
    assert audit["final_model"]["epsilon_lower_bound"] > 1.0
    assert any("AUDIT FAILED" in line for line in audit["summary_lines"])


def test_client_hook_follows_the_audit_config() -> None:
    """`with_canaries` (the ClientApp's hook) adds nothing unless `audit.canaries` is set,
    and then exactly the canaries the key includes for that client."""
    from omegaconf import OmegaConf

    from fedstack.audit.canaries import canaries_of_run, plan_from_config, with_canaries
    from fedstack.config import compose_config

    cfg = OmegaConf.create(OmegaConf.to_container(compose_config(["task=digits",
                                                                  "num_clients=3"])))
    x, y = np.zeros((10, 1, 8, 8), np.float32), np.zeros(10, np.int64)
    part = Partition((x, y), (x, y))
    assert plan_from_config(cfg) is None and with_canaries(cfg, 1, part) is part
    cfg.audit.canaries = 60
    with pytest.raises(ValueError, match=r"audit\.canary_key"):
        plan_from_config(cfg)
    cfg.audit.canary_key = bytes(range(32)).hex()
    cfg.audit.canary_holders = [1]
    plan = plan_from_config(cfg)
    assert plan is not None and set(plan.holders) == {1} and plan.kind == "ood"
    assert np.array_equal(plan.included, inclusion_bits(bytes(range(32)), 60))
    canaries = canaries_of_run(cfg, plan)
    assert canaries.inputs.shape == (60, 1, 8, 8) and canaries.inputs.min() < 0  # centred
    added = with_canaries(cfg, 1, part).train[0][10:]
    assert np.array_equal(added, canaries.inputs[plan.included])
    assert with_canaries(cfg, 0, part).train[0] is x  # holds none


# --------------------------------------------------------------------------- the claim per layer
def _client_level_record(mechanism: str, rounds: int, delta: float) -> object:
    """A client-level accountant's record as privacy.json holds it after `rounds` rounds."""
    import fedstack.privacy.distributed.ledger_record  # noqa: F401  (registers "skellam")
    from fedstack.privacy.client_accountant import ClientLevelRecord

    if mechanism == "gaussian":  # dp=central, Poisson cohorts
        empty = ClientLevelRecord("gaussian", "rdp", 1.2, 0.5, "poisson", delta)
    else:  # dp=distributed: ring units, every client every round
        empty = ClientLevelRecord("skellam", "rdp", 1.2, 1.0, "all", delta, details={
            "variance": 4.0e6, "l2_sensitivity": 1500.0, "l1_sensitivity": 30000.0})
    record = empty
    for r in range(1, rounds + 1):
        record = record.with_round(r)
    return record


@pytest.mark.parametrize("layer", ["none", "local", "central", "distributed"])
def test_claim_follows_the_dp_layer(layer: str, tmp_path: Path) -> None:
    """dp=local: the holders' record-level ε; dp=central/distributed: the client-level
    record of privacy.json, whose bar for one canary (replacing its client's data: twice
    the sensitivity, no amplification) is recomputed and never below it; no DP: nothing."""
    import json

    from fedstack.audit.one_run import claim_of_run
    from fedstack.privacy.client_accountant import client_level_epsilon
    from fedstack.privacy.distributed.accountant import SkellamRelease, epsilon

    summary = {"epsilon_per_client": {"0": 1.5, "1": 2.5, "2": 9.0}, "epsilon_max": 9.0,
               "delta_max": 1e-4}
    if layer == "none":
        summary = {"epsilon_max": None, "epsilon_per_client": {}, "delta_max": None}
    if layer in ("central", "distributed"):
        record = _client_level_record("gaussian" if layer == "central" else "skellam", 5, 1e-3)
        (tmp_path / "privacy.json").write_text(json.dumps({"client_level": record.to_json()}))
        summary = {"epsilon_max": record.epsilon, "epsilon_client_level": record.epsilon,
                   "epsilon_per_client": {}, "delta_max": 1e-3, "dp_unit": "client"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    claim = claim_of_run(tmp_path, layer, holders=[0, 1, 0])
    if layer == "none":
        assert (claim.unit, claim.epsilon, claim.canary_epsilon) == (None, None, None)
        return
    if layer == "local":
        assert (claim.unit, claim.epsilon, claim.canary_epsilon, claim.delta) == (
            "record", 2.5, 2.5, 1e-4)  # holder 2's 9.0 is not a canary holder's
        assert claim.covers_server_view
        return
    # The run's delta (1e-3: 2 m delta ~ 1 for m = 400) leaves the audit powerless; the
    # record recomputes both epsilons at the audit's delta.
    assert claim.unit == "client" and claim.delta == 1e-5
    assert (claim.run_epsilon, claim.run_delta) == (pytest.approx(record.epsilon), 1e-3)
    if layer == "central":
        at_audit = client_level_epsilon(1.2, 0.5, 5, 1e-5)
        want = client_level_epsilon(0.6, 1.0, 5, 1e-5)  # sigma/2, q = 1
        assert not claim.covers_server_view  # the trusted server sees updates in the clear
    else:
        at_audit = epsilon([SkellamRelease(4.0e6, 1500.0, 30000.0, 5)], 1e-5)
        want = epsilon([SkellamRelease(4.0e6, 3000.0, 60000.0, 5)], 1e-5)
        assert claim.covers_server_view  # it sees only the noisy sum
    assert claim.epsilon == pytest.approx(at_audit, rel=1e-9) and claim.epsilon > record.epsilon
    assert claim.canary_epsilon == pytest.approx(want, rel=1e-9)
    assert claim.canary_epsilon > claim.epsilon


def test_ceiling_is_what_a_perfect_attack_reaches() -> None:
    """At delta = 0.02 (the client-level default for 5 clients) 400 canaries can show
    nothing; at 1e-5 a perfect attack reaches the ceiling."""
    from fedstack.audit.one_run import epsilon_ceiling

    assert epsilon_ceiling(400, 0.02) == 0.0
    included = inclusion_bits(bytes(range(32)), 400)
    perfect = audit_scores(np.where(included, 1.0, -1.0), included, delta=1e-5)
    assert epsilon_ceiling(400, 1e-5) == pytest.approx(perfect.epsilon_lower_bound)
    assert 3 < perfect.epsilon_lower_bound < 4


@pytest.mark.parametrize("layer", ["local", "central", "distributed"])
def test_a_dp_run_without_its_accounting_is_not_audited_as_no_dp(layer: str,
                                                                  tmp_path: Path) -> None:
    from fedstack.audit.one_run import claim_of_run

    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="summary.json" if layer == "local" else "privacy.json"):
        claim_of_run(tmp_path, layer, holders=[0])


def test_trusted_server_view_is_measured_not_compared() -> None:
    """Under dp=central the server's view is outside the guarantee: a bound above the claim
    from it is a measurement; the same bound from the model fails the audit."""
    from fedstack.audit.one_run import PrivacyClaim, _scored

    claim = PrivacyClaim("central", "client", 0.3, 1e-5, "test", 0.6, "test", False)
    included = inclusion_bits(bytes(range(32)), 400)
    scores = np.where(included, 1.0, -1.0)  # a perfect attack: bound ~3 at 240 of 240
    view = _scored(scores, included, claim, "server view", server_view=True)
    assert view["passed"] and not view["covered_by_claim"]
    assert view["epsilon_lower_bound"] > 2 and "not covered" in view["message"]
    model = _scored(scores, included, claim, "final-model loss")
    assert not model["passed"] and model["covered_by_claim"]
    assert "AUDIT FAILED" in model["message"] and "record-level bar" in model["message"]
    covered = PrivacyClaim("distributed", "client", 0.3, 1e-5, "test", 0.6, "test", True)
    assert not _scored(scores, included, covered, "server view", server_view=True)["passed"]


@pytest.mark.parametrize("noise_scale", [1.0, 1e-6])
def test_audit_of_a_central_dp_run_uses_the_client_level_claim(
        noise_scale: float, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A real dp=central run (in-process grid) with canaries: the claim is the client-level
    ε of privacy.json at its δ. Honest, the model's bound stays below it and the audit
    passes, while the server's view (plain updates a trusted server receives) reveals the
    canaries far beyond that ε and is reported as outside the guarantee. With the server's
    noise switched off (the accountant still counts σ = 20) the model's bound exceeds even
    the record-level bar (twice the sensitivity) and the audit fails."""
    import json

    import fedstack.client_app as client_module
    import fedstack.privacy.central as central
    from fedstack.audit.one_run import audit_one_run
    from fedstack.config import compose_config
    from fedstack.server_app import run_server
    from tests.inprocess_grid import InProcessGrid

    monkeypatch.setenv("FEDSTACK_DP_STATE_DIR", str(tmp_path / "node-disk"))
    if noise_scale != 1.0:  # the lie, test-only: no config reaches it
        honest = central.NoisyClippedSum._gaussian
        monkeypatch.setattr(central.NoisyClippedSum, "_gaussian",
                            lambda self, size, std: honest(self, size, std * noise_scale))
    cfg = compose_config([
        "task=synthetic_cifar", "task.image_size=16", "task.num_samples=300",
        "task.model=digits_linear", "task.batch_size=4", "task.local_epochs=3",
        "task.learning_rate=1.0", "task.momentum=0", "partition=iid", "num_clients=2",
        "min_train_nodes=2", "num_rounds=1", "central_evaluation=false",
        "fraction_evaluate=0", "min_evaluate_nodes=0", "log_table=false",
        "dp=central", "dp.noise_multiplier=20", "dp.target_epsilon=null", "dp.delta=1e-5",
        "audit.record_round=1", "audit.canaries=400", "audit.canary_kind=ood",
        "audit.canary_holders=[0,1]", f"output_dir={tmp_path}", "run_name=c"])
    summary = run_server(InProcessGrid(client_module.app, 2), cfg)
    assert summary["status"] == "completed"
    run_dir = Path(summary["run_dir"])
    record = json.loads((run_dir / "privacy.json").read_text())["client_level"]
    audit = audit_one_run(run_dir, cfg)
    assert audit["claim_unit"] == "client" and audit["canary_unit"] == "record"
    assert audit["claimed_epsilon"] == pytest.approx(record["epsilon"])
    assert audit["claimed_epsilon"] == pytest.approx(summary["epsilon_client_level"])
    assert audit["delta"] == record["delta"] == 1e-5
    assert 0 < audit["claimed_epsilon"] < audit["canary_epsilon"] < 1.0
    model, view = audit["final_model"], audit["server_view"]
    assert view["epsilon_lower_bound"] > audit["canary_epsilon"] + 1.0
    assert not view["covered_by_claim"] and view["passed"]
    assert any("unit: client" in line for line in audit["summary_lines"])
    if noise_scale == 1.0:
        assert model["epsilon_lower_bound"] <= audit["claimed_epsilon"] and model["passed"]
        assert audit["passed"]
    else:
        assert model["epsilon_lower_bound"] > audit["canary_epsilon"] + 0.5
        assert not model["passed"] and audit["passed"] is False
        assert any("AUDIT FAILED" in line for line in audit["summary_lines"])
