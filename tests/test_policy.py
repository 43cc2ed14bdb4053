"""The data owner's policy: defaults, stricter-wins combination, checks and fixed codes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedstack import policy as P


@dataclass
class FakeContext:
    node_config: dict[str, Any] = field(default_factory=dict)


def _policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_defaults_and_roster_makes_signatures_required():
    policy = P.node_policy(FakeContext())
    assert policy == P.NodePolicy()
    assert policy.allowed_aggregations is None and policy.min_cohort == 3
    assert policy.clear_metrics == frozenset({"partition-id", "epsilon", "delta",
                                              "epsilon-budget"})
    assert not policy.require_signatures
    assert P.node_policy(FakeContext({"roster": "/r.txt"})).require_signatures
    assert not P.node_policy(FakeContext({"roster": "/r.txt",
                                          "require-signatures": "false"})).require_signatures


def test_node_config_keys_parse():
    policy = P.node_policy(FakeContext({
        "require-aggregation": "secagg, he", "min-threshold": "0.66", "min-cohort": 5,
        "require-signatures": True, "require-dp": "yes", "trust-server-dp": "false",
        "max-epsilon": 8, "min-noise-multiplier": "0.9", "clear-metrics": "partition-id,epsilon",
    }))
    assert policy == P.NodePolicy(
        allowed_aggregations=frozenset({"secagg", "he"}), min_threshold=0.66, min_cohort=5,
        require_signatures=True, require_dp=True, trust_server_dp=False, max_epsilon=8.0,
        min_noise_multiplier=0.9, clear_metrics=frozenset({"partition-id", "epsilon"}))


def test_file_and_node_config_combine_by_the_stricter_value(tmp_path):
    path = _policy_file(tmp_path, """
        require-aggregation = ["secagg", "he"]
        min-threshold = 0.7
        min-cohort = 4
        require-dp = true
        trust-server-dp = true
        max-epsilon = 5.0
        min-noise-multiplier = 0.8
        clear-metrics = ["partition-id", "epsilon"]
    """)
    node = {"policy": str(path), "require-aggregation": "secagg,fedavg", "min-threshold": 0.6,
            "min-cohort": 6, "require-dp": "false", "trust-server-dp": "false",
            "max-epsilon": 8.0, "min-noise-multiplier": 1.1, "clear-metrics": "epsilon,delta"}
    policy = P.node_policy(FakeContext(node))
    assert policy.allowed_aggregations == frozenset({"secagg"})
    assert policy.min_threshold == 0.7 and policy.min_cohort == 6
    assert policy.require_dp and not policy.trust_server_dp
    assert policy.max_epsilon == 5.0 and policy.min_noise_multiplier == 1.1
    assert policy.clear_metrics == frozenset({"epsilon"})
    # a key set only in the file applies as is
    only_file = P.node_policy(FakeContext({"policy": str(path)}))
    assert only_file.trust_server_dp and only_file.min_cohort == 4


def test_policy_file_change_is_picked_up(tmp_path):
    path = _policy_file(tmp_path, "min-cohort = 4\n")
    ctx = FakeContext({"policy": str(path)})
    assert P.node_policy(ctx).min_cohort == 4
    path.write_text("min-cohort = 12\n")
    assert P.node_policy(ctx).min_cohort == 12


@pytest.mark.parametrize("text, message", [
    ("min-cohort = \n", "not valid TOML"),
    ("min-cohorts = 3\n", "unknown key 'min-cohorts'"),
    ("min-cohort = 1\n", "key 'min-cohort'.*integer >= 2"),
    ("min-cohort = 2.5\n", "key 'min-cohort'"),
    ("min-threshold = 1.5\n", "key 'min-threshold'.*fraction"),
    ("max-epsilon = -1\n", "key 'max-epsilon'.*positive"),
    ("max-epsilon = nan\n", "key 'max-epsilon'.*finite"),
    ("require-dp = \"maybe\"\n", "key 'require-dp'.*boolean"),
    ("min-noise-multiplier = true\n", "key 'min-noise-multiplier'.*not a number"),
    ("clear-metrics = [1]\n", "key 'clear-metrics'"),
    ("require-aggregation = 3\n", "key 'require-aggregation'"),
])
def test_malformed_policy_file_names_file_and_key(tmp_path, text, message):
    path = _policy_file(tmp_path, text)
    with pytest.raises(P.PolicyError, match=message) as err:
        P.node_policy(FakeContext({"policy": str(path)}))
    assert str(path) in str(err.value)


def test_toml_error_names_the_line(tmp_path):
    path = _policy_file(tmp_path, "min-cohort = 4\nrequire-dp = tru\n")
    with pytest.raises(P.PolicyError, match="line 2"):
        P.node_policy(FakeContext({"policy": str(path)}))


def test_missing_file_and_bad_node_config_key_are_named(tmp_path):
    with pytest.raises(P.PolicyError, match=r"node config policy=.*cannot read"):
        P.node_policy(FakeContext({"policy": str(tmp_path / "absent.toml")}))
    with pytest.raises(P.PolicyError, match="node config min-cohort"):
        P.node_policy(FakeContext({"min-cohort": "many"}))


def test_disjoint_aggregation_lists_are_an_error(tmp_path):
    path = _policy_file(tmp_path, 'require-aggregation = ["he"]\n')
    with pytest.raises(P.PolicyError, match="no aggregation in common"):
        P.node_policy(FakeContext({"policy": str(path), "require-aggregation": "secagg"}))


def test_check_aggregation():
    P.NodePolicy().check_aggregation("fedavg")
    policy = P.NodePolicy(allowed_aggregations=frozenset({"secagg", "he"}))
    policy.check_aggregation("he")
    with pytest.raises(P.PolicyRefusal) as err:
        policy.check_aggregation("fedavg")
    assert err.value.code == "aggregation" and "fedavg" in err.value.detail


@pytest.mark.parametrize("kwargs, code", [
    ({"threshold": 3, "neighbourhood": 5, "cohort": 5}, None),        # 0.6
    ({"threshold": 3, "neighbourhood": 6, "cohort": 6}, "threshold"),  # exactly a half
    ({"threshold": 2, "neighbourhood": 5, "cohort": 5}, "threshold"),
    ({"threshold": 0, "neighbourhood": 5, "cohort": 5}, "threshold"),
    ({"threshold": 6, "neighbourhood": 5, "cohort": 5}, "threshold"),
    ({"threshold": 2, "neighbourhood": 2, "cohort": 2}, "cohort"),     # a two-party cohort
    ({"threshold": 2, "neighbourhood": 3, "cohort": 3}, None),
])
def test_check_secagg_default_floor(kwargs, code):
    policy = P.NodePolicy()
    if code is None:
        policy.check_secagg(security="semi-honest", **kwargs)
        return
    with pytest.raises(P.PolicyRefusal) as err:
        policy.check_secagg(security="semi-honest", **kwargs)
    assert err.value.code == code


def test_check_secagg_tightened():
    policy = P.NodePolicy(min_threshold=0.66, min_cohort=6, require_signatures=True)
    policy.check_secagg(security="malicious", threshold=6, neighbourhood=9, cohort=9)
    cases = [(dict(security="semi-honest", threshold=6, neighbourhood=9, cohort=9), "security"),
             (dict(security="malicious", threshold=3, neighbourhood=5, cohort=9), "threshold"),
             (dict(security="malicious", threshold=4, neighbourhood=5, cohort=5), "cohort")]
    for kwargs, code in cases:
        with pytest.raises(P.PolicyRefusal) as err:
            policy.check_secagg(**kwargs)
        assert err.value.code == code


@pytest.mark.parametrize("policy, call, code", [
    (P.NodePolicy(require_dp=True), dict(name="none", noise_multiplier=None, epsilon=None),
     "dp-required"),
    (P.NodePolicy(require_dp=True), dict(name="central", noise_multiplier=1.0, epsilon=None),
     "dp-required"),
    (P.NodePolicy(require_dp=True, trust_server_dp=True),
     dict(name="central", noise_multiplier=1.0, epsilon=None), None),
    (P.NodePolicy(require_dp=True), dict(name="local", noise_multiplier=1.0, epsilon=2.0), None),
    (P.NodePolicy(require_dp=True), dict(name="distributed", noise_multiplier=0.5,
                                         epsilon=None), None),
    (P.NodePolicy(min_noise_multiplier=0.8), dict(name="local", noise_multiplier=0.5,
                                                  epsilon=None), "dp-noise"),
    (P.NodePolicy(min_noise_multiplier=0.8), dict(name="distributed", noise_multiplier=None,
                                                  epsilon=None), "dp-noise"),
    (P.NodePolicy(min_noise_multiplier=0.8), dict(name="none", noise_multiplier=None,
                                                  epsilon=None), None),
    (P.NodePolicy(max_epsilon=3.0), dict(name="local", noise_multiplier=1.0, epsilon=3.0), None),
    (P.NodePolicy(max_epsilon=3.0), dict(name="local", noise_multiplier=1.0, epsilon=3.01),
     "dp-epsilon"),
    (P.NodePolicy(max_epsilon=3.0), dict(name="local", noise_multiplier=1.0,
                                         epsilon=float("nan")), "dp-epsilon"),
])
def test_check_dp(policy, call, code):
    if code is None:
        policy.check_dp(**call)
        return
    with pytest.raises(P.PolicyRefusal) as err:
        policy.check_dp(**call)
    assert err.value.code == code


def test_refusal_text_carries_no_data():
    policy = P.NodePolicy(max_epsilon=3.0, min_cohort=5)
    refusals = []
    for call in (lambda: policy.check_dp(name="local", noise_multiplier=1.0, epsilon=3.1234567),
                 lambda: policy.check_secagg(security="x", threshold=3, neighbourhood=4,
                                             cohort=4)):
        with pytest.raises(P.PolicyRefusal) as err:
            call()
        refusals.append(err.value)
    assert "3.1234567" in refusals[0].detail and "3.12" not in str(refusals[0])
    for refusal in refusals:
        assert str(refusal) == refusal.reason == f"node policy refuses: {refusal.code}"
        assert not any(ch.isdigit() for ch in str(refusal))
    with pytest.raises(ValueError):
        P.PolicyRefusal("weight 6001 outside bounds")


def test_clear_keeps_only_allowed_metrics():
    metrics = {"partition-id": 1, "num-examples": 120, "train-loss": 0.3, "epsilon": 1.2}
    assert P.NodePolicy().clear(metrics) == {"partition-id": 1, "epsilon": 1.2}
    only_id = P.NodePolicy(clear_metrics=frozenset({"partition-id"}))
    assert only_id.clear(metrics) == {"partition-id": 1}
    assert only_id.clear(metrics, {"num-examples"}) == {"partition-id": 1, "num-examples": 120}
    assert P.NodePolicy(clear_metrics=frozenset()).clear(metrics) == {}


def test_epsilon_budget_only_tightens():
    assert P.NodePolicy(max_epsilon=3.0).epsilon_budget(8.0) == 3.0
    assert P.NodePolicy(max_epsilon=9.0).epsilon_budget(8.0) == 8.0
    assert P.NodePolicy().epsilon_budget(None) is None
    assert P.NodePolicy(max_epsilon=2.0).epsilon_budget(None) == 2.0


def test_refusal_reply_is_a_fixed_error():
    from flwr.app import RecordDict
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata

    msg = make_message(Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=3,
                                reply_to_message_id="", group_id="1", created_at=time.time(),
                                ttl=3600.0, message_type="train"), content=RecordDict())
    reply = P.refusal_reply(msg, P.PolicyRefusal("cohort", "cohort 2 < 3"))
    assert reply.has_error() and reply.error.code == P.POLICY_REFUSED_CODE
    assert reply.error.reason == "node policy refuses: cohort"


def test_client_mods_keeps_the_old_import():
    from fedstack.strategies import client_mods

    assert client_mods.POLICY_REFUSED_CODE == P.POLICY_REFUSED_CODE


# --------------------------------------------------------------------------- the ClientApp mod


def _message(content, message_type: str = "train", src: int = 0, dst: int = 3):
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata

    return make_message(Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}",
                                 src_node_id=src, dst_node_id=dst, reply_to_message_id="",
                                 group_id="1", created_at=time.time(), ttl=3600.0,
                                 message_type=message_type), content=content)


@pytest.fixture(scope="module")
def config_texts() -> dict[str, str]:
    from fedstack.config import compose_config, config_to_yaml

    return {a: config_to_yaml(compose_config(["task=breast_cancer", f"aggregation={a}",
                                              "num_clients=3"]))
            for a in ("fedavg", "he", "secagg")}


def _run_mod(config_text: str, node_config: dict, handler_metrics: dict,
             message_type: str = "train"):
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

    from fedstack.config import CONFIG_MESSAGE_KEY
    from fedstack.strategies.client_mods import protocol_mod

    msg = _message(RecordDict({"config": ConfigRecord({CONFIG_MESSAGE_KEY: config_text})}),
                   message_type)
    context = Context(run_id=1, node_id=3, node_config=node_config, state=RecordDict(),
                      run_config={})

    def handler(m, ctx):
        return Message(RecordDict({"metrics": MetricRecord(handler_metrics)}), reply_to=m)

    return protocol_mod(msg, context, handler)


@pytest.fixture()
def passthrough_protocols(monkeypatch):
    """The he/secagg mods replaced by one that just calls the handler (filtering is ours)."""
    from fedstack.strategies import client_mods

    monkeypatch.setitem(client_mods.PROTOCOL_MODS, "he", "tests.test_policy:_passthrough_mod")
    monkeypatch.setitem(client_mods.PROTOCOL_MODS, "secagg",
                        "tests.test_policy:_passthrough_mod")


def _passthrough_mod(msg, context, call_next):
    return call_next(msg, context)


TRAIN_METRICS = {"partition-id": 1, "num-examples": 57, "train-loss": 0.25, "epsilon": 1.5,
                 "delta": 1e-5, "epsilon-budget": 8.0}
EVAL_METRICS = {"partition-id": 1, "num-examples": 19, "eval-loss": 0.3, "eval-accuracy": 0.9}


def test_mod_refuses_an_aggregation_the_node_did_not_agree_to(config_texts):
    reply = _run_mod(config_texts["fedavg"], {"require-aggregation": "secagg,he"}, TRAIN_METRICS)
    assert reply.has_error() and reply.error.code == P.POLICY_REFUSED_CODE
    assert reply.error.reason == "node policy refuses: aggregation"


def test_mod_refuses_to_train_without_dp_when_the_node_requires_it(config_texts):
    # config_texts are composed with dp=none: a node that requires DP never trains under it,
    # while evaluation of the (public) global model is still answered.
    reply = _run_mod(config_texts["fedavg"], {"require-dp": True}, TRAIN_METRICS)
    assert reply.has_error() and reply.error.reason == "node policy refuses: dp-required"
    reply = _run_mod(config_texts["fedavg"], {"require-dp": True}, EVAL_METRICS, "evaluate")
    assert not reply.has_error()
    assert not _run_mod(config_texts["fedavg"], {}, TRAIN_METRICS).has_error()


def test_mod_fails_closed_on_an_unreadable_policy(config_texts, tmp_path):
    bad = _policy_file(tmp_path, "min-cohort = 0\n")
    reply = _run_mod(config_texts["fedavg"], {"policy": str(bad)}, TRAIN_METRICS)
    assert reply.has_error() and reply.error.reason == "node policy refuses: misconfigured"
    assert str(tmp_path) not in reply.error.reason


def test_fedavg_replies_are_not_filtered(config_texts):
    reply = _run_mod(config_texts["fedavg"], {}, TRAIN_METRICS)
    assert dict(reply.content.metric_records["metrics"]) == TRAIN_METRICS


@pytest.mark.usefixtures("passthrough_protocols")
@pytest.mark.parametrize("aggregation, message_type, node_config, expected", [
    ("he", "train", {}, {"partition-id", "num-examples", "epsilon", "delta", "epsilon-budget"}),
    ("he", "evaluate", {}, {"partition-id", "num-examples", "eval-loss", "eval-accuracy"}),
    ("secagg", "train", {}, {"partition-id", "epsilon", "delta", "epsilon-budget"}),
    ("secagg", "evaluate", {}, {"partition-id"}),
    ("secagg", "train", {"clear-metrics": "partition-id"}, {"partition-id"}),
    ("he", "train", {"clear-metrics": "delta"}, {"num-examples", "delta"}),
])
def test_protocol_replies_carry_only_clear_metrics(config_texts, aggregation, message_type,
                                                   node_config, expected):
    metrics = TRAIN_METRICS if message_type == "train" else EVAL_METRICS
    reply = _run_mod(config_texts[aggregation], node_config, metrics, message_type)
    kept = dict(reply.content.metric_records["metrics"])
    assert set(kept) == expected
    assert all(kept[k] == metrics[k] for k in kept)


@pytest.mark.usefixtures("passthrough_protocols")
def test_a_decline_keeps_its_marker_and_zero_weight(config_texts):
    declined = {"partition-id": 1, "declined": 1, "num-examples": 0, "epsilon": 3.0}
    reply = _run_mod(config_texts["secagg"], {"clear-metrics": "partition-id"}, declined)
    assert dict(reply.content.metric_records["metrics"]) == {
        "partition-id": 1, "declined": 1, "num-examples": 0}
    # a "decline" that still reports a weight is not one: its weight stays on the node
    fake = {**declined, "num-examples": 57}
    reply = _run_mod(config_texts["secagg"], {"clear-metrics": "partition-id"}, fake)
    assert dict(reply.content.metric_records["metrics"]) == {"partition-id": 1}
