"""`dp=central` (user-level DP-FedAvg by a trusted server), driven through the real strategy
on the in-process grid with stand-in clients: the noise on the released aggregate has the
calibrated variance, one client moves the model by at most C/m whatever it sends, cohorts
are Poisson, adaptive clipping finds the target quantile, the budget stops the run, and the
config refuses what cannot be private."""

from __future__ import annotations

import math
import secrets

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedstack.config import ConfigError, compose_config
from fedstack.privacy.central import CentralPlan, NoisyClippedSum, poisson_cohort
from fedstack.privacy.central_strategy import CentralDPFedAvg
from fedstack.privacy.client_accountant import SAMPLING_ALL, client_level_epsilon
from fedstack.privacy.secure_random import AesCtrRandom
from tests.inprocess_grid import InProcessGrid

#: Parameters of the stand-in model (one float array and an integer counter).
SIZE = 200
CLIP = 1.0


def _plan(sigma: float = 1.3, clients: int = 4, count_std: float | None = None,
          update_sigma: float | None = None, budget: float | None = None,
          server_lr: float = 0.7) -> CentralPlan:
    return CentralPlan(
        clip_norm=CLIP, noise_multiplier=sigma,
        update_noise_multiplier=update_sigma if update_sigma is not None else sigma,
        clipped_count_stddev=count_std, sample_rate=1.0, sampling=SAMPLING_ALL,
        expected_clients=float(clients), delta=1e-3, accountant="rdp", budget=budget,
        server_learning_rate=server_lr, target_quantile=0.5, clip_learning_rate=0.2)


def _updates(clients: int) -> list[np.ndarray]:
    """Stand-in updates: norms from well inside to far beyond C, in different directions."""
    rng = np.random.default_rng(7)
    norms = [0.3, 2.0, 10.0, 0.9, 1e6][:clients]
    out = []
    for norm in norms:
        v = rng.standard_normal(SIZE)
        out.append(v / np.linalg.norm(v) * norm)
    return out


def _standin_app(updates: list[np.ndarray]):
    """A ClientApp that replies the global model plus its fixed update (no training)."""

    def app(msg: Message, context: Context) -> Message:
        index = int(context.node_config["partition-id"])
        arrays = msg.content["arrays"]
        weights = arrays["w"].numpy().astype(np.float64) + updates[index]
        reply = ArrayRecord({"w": Array(weights.astype(np.float32)),
                             "count": Array(arrays["count"].numpy() + 5)})
        return Message(RecordDict({"arrays": reply, "metrics": MetricRecord(
            {"num-examples": 10 * (index + 1), "partition-id": index})}), reply_to=msg)

    return app


def _initial() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32)),
                        "count": Array(np.array([3], dtype=np.int64))})


class _Capture:
    """Round recorder keeping each round's released model."""

    def __init__(self) -> None:
        self.models: dict[int, np.ndarray] = {}
        self.counts: list[int] = []

    def on_round_end(self, round_log, arrays: ArrayRecord) -> None:
        self.models[round_log.server_round] = arrays["w"].numpy().astype(np.float64)
        self.counts.append(int(arrays["count"].numpy()[0]))


def _strategy(plan: CentralPlan, **kwargs) -> CentralDPFedAvg:
    return CentralDPFedAvg(plan=plan, fraction_evaluate=0.0, min_evaluate_nodes=0,
                           timeout=10.0, **kwargs)


def _clipped(update: np.ndarray, clip: float) -> np.ndarray:
    return update * min(1.0, clip / float(np.linalg.norm(update)))


@pytest.mark.parametrize("adaptive", [False, True])
def test_noise_on_the_released_aggregate_has_the_calibrated_variance(adaptive: bool) -> None:
    clients, rounds = 4, 250
    updates = _updates(clients)
    plan = (_plan(sigma=1.3, clients=clients, count_std=1.0, update_sigma=1.3 / math.sqrt(
        1 - (1.3 / 2.0) ** 2)) if adaptive else _plan(sigma=1.3, clients=clients))
    strategy = _strategy(plan)
    capture = _Capture()
    # Each round starts from the last model; the update only depends on the fixed deltas.
    strategy.start(InProcessGrid(_standin_app(updates), clients), _initial(),
                   num_rounds=rounds, recorder=capture)
    clips = strategy.record.details["clip_norm"]
    residuals = []
    previous = np.zeros(SIZE)
    for server_round in range(1, rounds + 1):
        clip = clips[server_round - 1]
        expected = plan.server_learning_rate * sum(_clipped(u, clip) for u in updates) \
            / plan.expected_clients
        released = capture.models[server_round] - previous
        previous = capture.models[server_round]
        std = plan.server_learning_rate * plan.update_noise_multiplier * clip \
            / plan.expected_clients
        residuals.append((released - expected) / std)
    z = np.concatenate(residuals)
    # 50 000 standardised residuals (float32 model rounding is ~1e-7 of them): N(0, 1).
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert z.var() == pytest.approx(1.0, rel=0.03)
    assert capture.counts[-1] == 3  # integer buffers are kept, never noised or averaged
    if adaptive:
        assert len(set(clips)) > 1  # C moved
    assert strategy.record.rounds == tuple(range(1, rounds + 1))
    assert strategy.record.epsilon == client_level_epsilon(1.3, 1.0, rounds, 1e-3, "rdp")


def _one_round(updates: list[np.ndarray], offline: set[int], key: bytes) -> np.ndarray:
    plan = _plan(clients=4)
    strategy = _strategy(plan, random_factory=lambda: AesCtrRandom(key))
    grid = InProcessGrid(_standin_app(updates), len(updates))
    grid.offline = {grid.node_ids[i] for i in offline}
    capture = _Capture()
    strategy.start(grid, _initial(), num_rounds=1, recorder=capture)
    return capture.models[1]


def test_one_client_moves_the_model_by_at_most_c_over_m() -> None:
    """Neighbouring cohorts (with and without client 4, whose update has norm 1e6) under the
    same noise: the released models differ by exactly its clipped update / m, never more."""
    updates = _updates(5)
    key = secrets.token_bytes(32)
    without = _one_round(updates, offline={4}, key=key)
    with_it = _one_round(updates, offline=set(), key=key)
    plan = _plan(clients=4)
    bound = plan.server_learning_rate * CLIP / plan.expected_clients
    difference = with_it - without
    assert np.linalg.norm(difference) <= bound * (1 + 1e-5)
    np.testing.assert_allclose(difference, _clipped(updates[4], CLIP)
                               * plan.server_learning_rate / plan.expected_clients, atol=1e-5)
    # ... and the noise is there (the same key gave the same noise to both runs).
    assert np.linalg.norm(without) > 10 * bound


def test_cohorts_are_poisson_sampled_from_a_secret_generator() -> None:
    candidates = list(range(400))
    sizes, hits = [], np.zeros(400)
    for _ in range(200):
        cohort = poisson_cohort(candidates, 0.1)
        sizes.append(len(cohort))
        hits[cohort] += 1
    # Binomial(400, 0.1) cohort sizes: mean 40, std 6; never a fixed size.
    assert np.mean(sizes) == pytest.approx(40, abs=2.0)
    assert 3 < np.std(sizes) < 9
    assert hits.mean() / 200 == pytest.approx(0.1, abs=0.01)
    assert poisson_cohort(candidates, 1.0) == candidates


def test_adaptive_clipping_converges_to_the_target_quantile() -> None:
    """Andrew et al.: from C = 0.1, synthetic update norms with median 3 and 100 clients a
    round; C settles at the median (γ = 0.5) and the clipped share at γ."""
    rng = np.random.default_rng(3)
    plan = CentralPlan(clip_norm=0.1, noise_multiplier=1.0, update_noise_multiplier=1.0,
                       clipped_count_stddev=100 / 20, sample_rate=1.0, sampling=SAMPLING_ALL,
                       expected_clients=100.0, delta=1e-3, accountant="rdp", budget=None,
                       target_quantile=0.5, clip_learning_rate=0.2)
    clip, trajectory, shares = 0.1, [], []
    for _ in range(200):
        norms = np.exp(rng.normal(math.log(3.0), 0.5, size=100))
        mechanism = NoisyClippedSum(1, clip, plan)
        for norm in norms:
            mechanism.add(np.array([norm]))
        shares.append(float(np.mean(norms <= clip)))
        clip = mechanism.release().next_clip_norm
        trajectory.append(clip)
    assert np.mean(trajectory[-50:]) == pytest.approx(3.0, rel=0.1)
    assert np.mean(shares[-50:]) == pytest.approx(0.5, abs=0.08)
    assert trajectory[20] < trajectory[40]  # it climbs geometrically from 0.1


def test_the_run_stops_before_a_round_would_exceed_the_budget() -> None:
    updates = _updates(4)
    epsilon_3 = client_level_epsilon(1.3, 1.0, 3, 1e-3, "rdp")
    strategy = _strategy(_plan(sigma=1.3, budget=epsilon_3))
    capture = _Capture()
    strategy.start(InProcessGrid(_standin_app(updates), 4), _initial(), num_rounds=6,
                   recorder=capture)
    assert strategy.record.rounds == (1, 2, 3)
    assert strategy.record.epsilon == epsilon_3
    assert "round 4 would take" in (strategy.stop_reason or "")
    assert sorted(capture.models) == [1, 2, 3]  # round 4 released nothing


@pytest.mark.parametrize("overrides,message", [
    (["aggregation=secagg"], "dp=central needs aggregation=fedavg"),
    (["dp.noise_multiplier=1.0"], "set exactly one of them"),
    (["num_clients=5", "fraction_train=0.1"], "must be >= 1"),
    (["dp.adaptive_clipping=true", "dp.noise_multiplier=2.0", "dp.target_epsilon=null",
      "dp.clipped_count_stddev=0.5"], "dp.clipped_count_stddev=0.5 must exceed"),
    (["dp.clip_norm=0"], "dp.clip_norm=0"),
])
def test_config_refuses_what_cannot_be_private(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config(["dp=central", *overrides])


def test_a_resumed_run_continues_the_accountant_and_the_clipping_bound(tmp_path) -> None:
    """privacy.json's record (ε, C) is where a resumed run's strategy starts from."""
    import json

    from fedstack.config import with_values

    cfg = compose_config(["dp=central", "num_clients=4", "dp.noise_multiplier=1.3",
                          "dp.target_epsilon=null", "dp.delta=0.001", "num_rounds=6",
                          "dp.adaptive_clipping=true", "dp.clipped_count_stddev=2.0"])
    first = CentralDPFedAvg.from_config(cfg, tmp_path, fraction_evaluate=0.0,
                                        min_evaluate_nodes=0, timeout=10.0)
    first.start(InProcessGrid(_standin_app(_updates(4)), 4), _initial(), num_rounds=3)
    (tmp_path / "privacy.json").write_text(json.dumps(
        {"client_level": first.record.to_json()}))
    resumed = CentralDPFedAvg.from_config(with_values(cfg, resume=str(tmp_path)), tmp_path,
                                          fraction_evaluate=0.0, min_evaluate_nodes=0,
                                          timeout=10.0)
    assert resumed.record == first.record and resumed.clip_norm == first.clip_norm != 1.0
    resumed.start(InProcessGrid(_standin_app(_updates(4)), 4), _initial(), num_rounds=4,
                  first_round=4)
    assert resumed.record.rounds == (1, 2, 3, 4)
    assert resumed.record.epsilon == client_level_epsilon(1.3, 1.0, 4, 0.001, "rdp")
    other = with_values(cfg, resume=str(tmp_path), dp={**cfg.dp, "noise_multiplier": 2.0})
    with pytest.raises(ValueError, match=r"accounts σ=1\.3"):
        CentralDPFedAvg.from_config(other, tmp_path)
