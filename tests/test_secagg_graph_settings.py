"""Neighbour graphs, per-round parameters and the secagg settings schema."""

import os

import numpy as np
import pytest
import yaml

from fedstack.crypto.quantise import FixedPointCodec
from fedstack.strategies.secagg import graph
from fedstack.strategies.secagg.params import ProtocolParams
from fedstack.strategies.secagg.settings import SecAggSettings

CODEC = FixedPointCodec(32, 1.0, 1024.0, 10, 100)
CFG = {"num_clients": 5, "max_num_examples": 2000}


def test_sparse_graph_is_regular_symmetric_and_seed_determined():
    ids = list(range(100, 150))
    seed = os.urandom(32)
    g = graph.neighbours(seed, 3, ids, 8)
    assert all(len(v) == 8 and u not in v for u, v in g.items())
    assert all(u in g[v] for u, vs in g.items() for v in vs)
    assert g == graph.neighbours(seed, 3, list(reversed(ids)), 8)  # order-independent
    assert g != graph.neighbours(os.urandom(32), 3, ids, 8)
    assert g != graph.neighbours(seed, 4, ids, 8)
    full = graph.neighbours(seed, 3, ids[:5], 8)  # degree >= n-1: complete
    assert all(len(v) == 4 for v in full.values())


def test_round_parameters():
    sparse = ProtocolParams(CODEC, graph="sparse", threshold=0.6)
    assert sparse.degree(1000) == 30 and sparse.round_threshold(1000) == 19
    assert sparse.degree(5) == 4  # auto degree capped at n-1
    complete = ProtocolParams(CODEC, threshold=3)
    assert complete.round_threshold(5) == 3
    with pytest.raises(ValueError, match="half"):
        complete.round_threshold(6)  # 3 of 6 would let a server collect both share kinds
    with pytest.raises(ValueError, match="exceeds"):
        complete.round_threshold(2)
    with pytest.raises(ValueError):
        ProtocolParams(CODEC, threshold=0.5)
    with pytest.raises(ValueError):
        ProtocolParams(CODEC, graph="sparse", neighbours=5)


def test_yaml_matches_schema_defaults():
    path = os.path.join(os.path.dirname(__file__), "..", "conf", "aggregation", "secagg.yaml")
    with open(path) as fh:
        data = yaml.safe_load(fh)
    assert SecAggSettings(**data) == SecAggSettings()
    SecAggSettings(**data).validate(CFG)


@pytest.mark.parametrize(
    "override,key",
    [
        ({"threshold": 0.5}, "aggregation.threshold"),
        ({"threshold": 9}, "aggregation.threshold"),
        ({"graph": "ring"}, "aggregation.graph"),
        ({"neighbours": 3}, "aggregation.neighbours"),
        ({"prg": "rc4"}, "aggregation.prg"),
        ({"bits": 16}, "aggregation.bits"),
        ({"scale": 1e9}, "aggregation.bits"),
        ({"clip": 1000.0}, "aggregation.max_quant_error"),
        ({"max_clients": 3}, "aggregation.max_clients"),
        ({"stage_timeout": 0}, "aggregation.stage_timeout"),
        ({"security": "trusting"}, "aggregation.security"),
    ],
)
def test_invalid_settings_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        SecAggSettings(**override).validate(CFG)


def test_auto_weight_needs_max_num_examples():
    with pytest.raises(ValueError, match="max_num_examples"):
        SecAggSettings(max_weight=0).validate({"num_clients": 5})
    codec = SecAggSettings(max_weight=500).protocol({}).codec
    assert codec.max_weight == 500 and codec.error_bound <= 1e-3


@pytest.mark.parametrize("degree", [4, 8, 49])
def test_one_partys_neighbours_equal_its_row_of_the_whole_graph(degree):
    """What a client computes for itself alone is its row of the server's graph."""
    ids = [int(v) for v in np.random.default_rng(degree).choice(10**9, size=50, replace=False)]
    seed = os.urandom(32)
    whole = graph.neighbours(seed, 2, ids, degree)
    assert [graph.neighbours_of(seed, 2, ids, degree, u) for u in ids] == [whole[u] for u in ids]
    if degree < len(ids) - 1:  # the test can fail: another round's graph is another row set
        other = [graph.neighbours_of(seed, 3, ids, degree, u) for u in ids]
        assert other != [whole[u] for u in ids]
    with pytest.raises(ValueError, match="even"):
        graph.neighbours_of(seed, 2, ids, 5, ids[0])
