"""`conf/dp/local.yaml` and its schema: every key a field, clear errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fedstack.config import ConfigError, compose_config
from fedstack.privacy.settings import LocalDPSettings

YAML = Path(__file__).resolve().parents[1] / "conf" / "dp" / "local.yaml"


def test_yaml_keys_are_the_fields_with_the_same_defaults() -> None:
    data = yaml.safe_load(YAML.read_text())
    fields = {f.name: f.default for f in dataclasses.fields(LocalDPSettings)}
    assert data == fields


def test_compose_with_dp_local() -> None:
    cfg = compose_config(["dp=local", "dp.target_epsilon=2.0", "dp.accountant=prv"])
    assert cfg.dp.name == "local" and cfg.dp.target_epsilon == 2.0


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["dp.max_grad_norm=0"], "dp.max_grad_norm"),
        (["dp.noise_multiplier=1.0"], "dp.target_epsilon"),  # both set
        (["dp.target_epsilon=null"], "dp.noise_multiplier"),  # neither set
        (["dp.target_epsilon=null", "dp.noise_multiplier=0"], "dp.noise_multiplier"),
        (["dp.target_epsilon=-1"], "dp.target_epsilon"),
        (["dp.delta=1.5"], "dp.delta"),
        (["dp.accountant=gdp"], "dp.accountant"),
        (["dp.grad_sample_mode=fast"], "dp.grad_sample_mode"),
        (["dp.max_epsilon=2", "dp.target_epsilon=8"], "dp.max_epsilon"),
        (["dp.max_epsilon=0"], "dp.max_epsilon"),
    ],
)
def test_invalid_settings_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(["dp=local", *overrides])
