"""Config composition and validation: bad keys/values/combinations fail naming the key."""

from __future__ import annotations

import pytest

from fedstack.config import (
    ConfigError,
    compose_config,
    config_from_yaml,
    config_to_yaml,
    overrides_from_run_config,
)


def test_defaults_compose_and_validate() -> None:
    cfg = compose_config()
    assert cfg.task.name == "digits" and cfg.aggregation.name == "fedavg"
    assert cfg.dp.name == "none" and cfg.partition.name == "dirichlet"
    assert cfg.partition.alpha == 0.5 and cfg.num_clients == 5 and cfg.seed == 42
    assert "hydra" not in cfg


def test_group_choices_and_overrides_from_run_config() -> None:
    run_config = {"task": "breast_cancer", "aggregation": "fedavg", "dp": "none",
                  "partition": "dirichlet", "overrides": "num_rounds=20 partition.alpha=0.1"}
    overrides = overrides_from_run_config(run_config)
    cfg = compose_config(overrides)
    assert cfg.task.name == "breast_cancer" and cfg.num_rounds == 20
    assert cfg.partition.alpha == pytest.approx(0.1)


def test_quoted_override_values_survive() -> None:
    cfg = compose_config(overrides_from_run_config({"overrides": "run_name='my-run'"}))
    assert cfg.run_name == "my-run"


@pytest.mark.parametrize(("overrides", "named"), [
    (["num_rounds=0"], "num_rounds"),
    (["num_clients=-1"], "num_clients"),
    (["min_train_nodes=9"], "min_train_nodes"),
    (["fraction_train=1.5"], "fraction_train"),
    (["partition.alpha=0"], "partition.alpha"),
    (["partition=shards", "partition.shards_per_client=0"], "partition.shards_per_client"),
    (["task.batch_size=abc"], "task.batch_size"),
    (["task.learning_rate=-1"], "task.learning_rate"),
    (["task.model=resnet"], "task.model"),
    (["task.optimizer=rmsprop"], "task.optimizer"),
    (["+task.bogus=1"], "task.bogus"),
    (["+bogus=1"], "bogus"),
    (["aggregation=nope"], "aggregation"),
    (["partition=nope"], "partition"),
    (["task=hf"], "task.dataset"),
    (["round_timeout=0"], "round_timeout"),
])
def test_bad_config_fails_naming_the_key(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    assert named in str(info.value)


def test_unparseable_overrides_string_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="overrides"):
        overrides_from_run_config({"overrides": "num_rounds='3"})


def test_yaml_round_trip_revalidates() -> None:
    cfg = compose_config(["task=breast_cancer", "num_rounds=4"])
    again = config_from_yaml(config_to_yaml(cfg))
    assert again == cfg
    tampered = config_to_yaml(cfg).replace("num_rounds: 4", "num_rounds: -4")
    with pytest.raises(ConfigError, match="num_rounds"):
        config_from_yaml(tampered)


def test_resolved_config_is_read_only() -> None:
    cfg = compose_config()
    with pytest.raises(Exception):  # noqa: B017 - omegaconf's ReadonlyConfigError
        cfg.num_rounds = 3
