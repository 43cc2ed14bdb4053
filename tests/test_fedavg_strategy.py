"""WeightedFedAvg: exact weighted mean, memory independent of K, every bad reply dropped."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedstack.client_app import app as client_app
from fedstack.config import CONFIG_MESSAGE_KEY, compose_config, config_to_yaml
from fedstack.strategies.fedavg import WeightedFedAvg
from fedstack.strategies.model_layout import ModelLayout
from fedstack.strategies.reply_validation import array_view
from tests.inprocess_grid import InProcessGrid
from tests.reply_factory import array_record, error_reply, train_reply

SHAPES = {"conv.weight": (8, 1, 3, 3), "conv.bias": (8,), "fc.weight": (10, 72), "fc.bias": (10,)}


def random_arrays(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def strategy_for(global_arrays: dict[str, np.ndarray], **kwargs) -> WeightedFedAvg:
    strategy = WeightedFedAvg(**kwargs)
    strategy._spec = ModelLayout.of(array_record(global_arrays))
    return strategy


@pytest.mark.parametrize("num_clients", [1, 3, 17])
def test_weighted_mean_matches_numpy(num_clients: int) -> None:
    rng = np.random.default_rng(num_clients)
    reference = random_arrays(rng)
    clients = [random_arrays(rng, scale=10.0 ** rng.integers(-3, 3)) for _ in range(num_clients)]
    weights = [int(w) for w in rng.integers(1, 5000, size=num_clients)]
    replies = [train_reply(i + 1, c, num_examples=w, metrics={"train-loss": float(i)})
               for i, (c, w) in enumerate(zip(clients, weights, strict=True))]
    strategy = strategy_for(reference)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    total = sum(weights)
    for name in SHAPES:
        expected = sum(np.float64(w) * c[name].astype(np.float64)
                       for c, w in zip(clients, weights, strict=True)) / total
        got = arrays[name].numpy()
        assert got.dtype == np.float32 and got.shape == SHAPES[name]
        np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert metrics["num-examples"] == total
    expected_loss = sum(w * i for i, w in enumerate(weights)) / total
    assert math.isclose(metrics["train-loss"], expected_loss, rel_tol=1e-12)
    assert strategy.round_log.aggregated == list(range(1, num_clients + 1))


def test_aggregate_is_readable_by_flower_and_torch() -> None:
    rng = np.random.default_rng(0)
    ref = random_arrays(rng)
    arrays, _ = strategy_for(ref).aggregate_train(1, [train_reply(1, ref, num_examples=3)])
    state = arrays.to_torch_state_dict()
    for name in SHAPES:
        np.testing.assert_array_equal(state[name].numpy(), ref[name])


def _peak_bytes(num_replies: int, size: int) -> int:
    rng = np.random.default_rng(1)
    ref = {"w": rng.standard_normal(size).astype(np.float32)}
    replies = [train_reply(i + 1, {"w": rng.standard_normal(size).astype(np.float32)},
                           num_examples=i + 1) for i in range(num_replies)]
    strategy = strategy_for(ref)
    tracemalloc.start()
    try:
        strategy.aggregate_train(1, replies)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_aggregation_memory_does_not_grow_with_replies() -> None:
    size = 200_000  # 0.8 MB per float32 reply
    few, many = _peak_bytes(4, size), _peak_bytes(40, size)
    # O(model), whatever K is: the output being serialised (<= 2.5x one float32 model at the
    # moment its bytes are finalised), never a K-fold or a full float64 copy per reply.
    assert many < few * 1.25 + 64_000
    assert many < 2.5 * 4 * size


def _bad_replies(ref: dict[str, np.ndarray]) -> dict[str, object]:
    wrong_shape = dict(ref, **{"fc.bias": np.zeros(11, np.float32)})
    wrong_dtype = dict(ref, **{"fc.bias": np.zeros(10, np.float64)})
    with_nan = {k: v.copy() for k, v in ref.items()}
    with_nan["fc.weight"][3, 4] = np.nan
    with_inf = {k: v.copy() for k, v in ref.items()}
    with_inf["conv.bias"][0] = np.inf
    missing = {k: v for k, v in ref.items() if k != "conv.bias"}
    extra = dict(ref, extra=np.zeros(2, np.float32))
    return {
        "wrong shape": train_reply(11, wrong_shape),
        "wrong dtype": train_reply(12, wrong_dtype),
        "nan": train_reply(13, with_nan),
        "inf": train_reply(14, with_inf),
        "missing array": train_reply(15, missing),
        "extra array": train_reply(16, extra),
        "no arrays": train_reply(17, None),
        "zero examples": train_reply(18, ref, num_examples=0),
        "negative examples": train_reply(19, ref, num_examples=-5),
        "fractional examples": train_reply(20, ref, num_examples=2.5),
        "too many examples": train_reply(21, ref, num_examples=10**9),
        "no num-examples": train_reply(22, ref, num_examples=None),
        "client error": error_reply(23),
        "nan metric": train_reply(24, ref, metrics={"train-loss": float("nan")}),
    }


def test_every_kind_of_bad_reply_is_rejected_and_the_rest_aggregated() -> None:
    rng = np.random.default_rng(2)
    ref = random_arrays(rng)
    good = [random_arrays(rng) for _ in range(2)]
    bad = _bad_replies(ref)
    replies = [train_reply(1, good[0], num_examples=30), *bad.values(),
               train_reply(2, good[1], num_examples=10)]
    strategy = strategy_for(ref, max_num_examples=100_000)
    arrays, _ = strategy.aggregate_train(1, replies)
    rejected = strategy.round_log.rejected
    assert sorted(rejected) == list(range(11, 25)), rejected
    assert all(isinstance(reason, str) and reason for reason in rejected.values())
    assert "NaN" in rejected[13] and "shape" in rejected[11] and "dtype" in rejected[12]
    assert "max_num_examples" in rejected[21]
    for name in SHAPES:
        expected = (30 * good[0][name].astype(np.float64) + 10 * good[1][name]) / 40
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_duplicate_reply_from_a_node_is_rejected() -> None:
    rng = np.random.default_rng(3)
    ref = random_arrays(rng)
    strategy = strategy_for(ref)
    strategy.aggregate_train(1, [train_reply(5, ref), train_reply(5, ref)])
    assert strategy.round_log.aggregated == [5]
    assert "duplicate" in strategy.round_log.rejected[5]


def test_too_few_valid_replies_keep_the_previous_model() -> None:
    rng = np.random.default_rng(4)
    ref = random_arrays(rng)
    strategy = strategy_for(ref, min_valid_replies=2)
    bad = {k: v.copy() for k, v in ref.items()}
    bad["fc.bias"][:] = np.nan
    arrays, metrics = strategy.aggregate_train(1, [train_reply(1, ref), train_reply(2, bad)])
    assert arrays is None and metrics is None
    assert "min_valid_replies=2" in strategy.round_log.aborted


def test_truncated_array_payload_is_rejected() -> None:
    rng = np.random.default_rng(5)
    ref = random_arrays(rng)
    record = array_record(ref)
    original = record["fc.weight"]
    record["fc.weight"] = Array(dtype=original.dtype, shape=original.shape, stype=original.stype,
                                data=original.data[:-8])
    strategy = strategy_for(ref)
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, record), train_reply(2, ref)])
    assert "payload" in strategy.round_log.rejected[1]
    np.testing.assert_array_equal(arrays["fc.weight"].numpy(), ref["fc.weight"])


def test_array_view_is_zero_copy() -> None:
    arr = Array(np.arange(12, dtype=np.float32).reshape(3, 4))
    view = array_view(arr)
    assert not view.flags.owndata and not view.flags.writeable
    np.testing.assert_array_equal(view, np.arange(12).reshape(3, 4))


def test_evaluate_aggregation_is_weighted_and_skips_bad_replies() -> None:
    strategy = WeightedFedAvg()
    replies = [
        train_reply(1, None, {"eval-loss": 1.0, "eval-accuracy": 0.5}, num_examples=10,
                    message_type="evaluate"),
        train_reply(2, None, {"eval-loss": 3.0, "eval-accuracy": 1.0}, num_examples=30,
                    message_type="evaluate"),
        train_reply(3, None, {"eval-loss": 100.0, "eval-accuracy": 0.0}, num_examples=0,
                    message_type="evaluate"),
        error_reply(4, message_type="evaluate"),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert isinstance(metrics, MetricRecord)
    assert metrics["eval-loss"] == pytest.approx(2.5)
    assert metrics["eval-accuracy"] == pytest.approx(0.875)


def test_sampling_follows_the_seed_and_respects_minimums(tmp_path) -> None:
    grid = InProcessGrid(client_app, num_nodes=10)
    picks = []
    for _ in range(2):
        strategy = WeightedFedAvg(fraction_train=0.3, min_train_nodes=4, seed=7)
        strategy.round_log.server_round = 3
        picks.append(strategy.sample_nodes(grid, 0.3, 4, "train"))
    assert picks[0] == picks[1] and len(picks[0]) == 4
    other = WeightedFedAvg(seed=8)
    other.round_log.server_round = 3
    assert other.sample_nodes(grid, 0.3, 4, "train") != picks[0]


def test_a_round_with_tampered_replies_through_the_client_app(tmp_path) -> None:
    """Real ClientApp in process: one client's update is poisoned with NaN, one never answers."""
    cfg = compose_config(["task=breast_cancer", "num_rounds=2", f"output_dir={tmp_path}",
                          "partition=iid"])
    grid = InProcessGrid(client_app, num_nodes=4)
    poisoned, silent = grid.node_ids[0], grid.node_ids[1]

    def hook(node, request, reply):
        if node == silent:
            return None
        if node == poisoned and request.metadata.message_type == "train":
            arrays = reply.content["arrays"]
            name = next(iter(arrays.keys()))
            bad = arrays[name].numpy().copy()
            bad.flat[0] = np.nan
            arrays[name] = Array(bad)
        return reply

    grid.reply_hook = hook
    strategy = WeightedFedAvg(seed=0)
    from fedstack.task.models import build_model

    model = build_model("tabular_mlp", (30,), 2, seed=0)
    config = ConfigRecord({CONFIG_MESSAGE_KEY: config_to_yaml(cfg)})
    result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=1,
                            train_config=config, evaluate_config=config)
    assert list(strategy.round_log.rejected) == [poisoned]
    assert "NaN" in strategy.round_log.rejected[poisoned]
    assert sorted(strategy.round_log.aggregated) == sorted(grid.node_ids[2:])
    assert all(np.isfinite(a.numpy()).all() for a in result.arrays.values())
