"""`aggregation=he` configuration: schema matches the YAML, validation names the keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fedstack.strategies.he.settings import HESettings

ROOT = Path(__file__).resolve().parent.parent


def test_yaml_keys_and_defaults_match_the_schema():
    data = yaml.safe_load((ROOT / "conf" / "aggregation" / "he.yaml").read_text())
    fields = {f.name: f.default for f in dataclasses.fields(HESettings)}
    assert data == fields


def test_default_is_valid_and_auto_scale_is_the_largest_safe_one():
    s = HESettings()
    s.validate({"num_clients": 5})
    cap = s.capacity()
    assert cap.scale_bits == cap.max_scale_bits == 30
    assert 0 < cap.headroom_bits < 1
    assert cap.worst_abs_error < s.max_abs_error


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"preset": "huge"}, "aggregation.preset"),
        ({"max_clients": 3}, "aggregation.max_clients"),
        ({"scale_bits": 45}, "scale_bits"),
        ({"scale_bits": 5}, "aggregation.scale_bits"),
        ({"max_weight": 10**6}, "aggregation.max_abs_error"),
        ({"max_weight": 10**9}, "max_weight"),
        ({"max_abs_value": 0.0}, "aggregation.max_abs_value"),
        ({"name": "fedavg"}, "aggregation.name"),
    ],
)
def test_bad_configs_name_the_key(changes, key):
    from fedstack.config import ConfigError

    s = dataclasses.replace(HESettings(), **changes)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        s.validate({"num_clients": 5})


def test_precise_preset_buys_precision():
    std = HESettings().capacity()
    precise = HESettings(preset="precise").capacity()
    assert precise.scale_bits == std.scale_bits + 5
    assert precise.worst_abs_error < std.worst_abs_error / 20


def test_compose_with_hydra():
    from fedstack.config import ConfigError, compose_config

    cfg = compose_config(["aggregation=he"])
    assert cfg.aggregation.name == "he"
    assert cfg.aggregation.preset == "standard"
    with pytest.raises(ConfigError, match="max_clients"):
        compose_config(["aggregation=he", "aggregation.max_clients=2"])
