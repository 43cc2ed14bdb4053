"""The client side of every aggregation protocol, as one ClientApp mod.

Flower binds mods when the ClientApp is defined, before any configuration exists, so the
ClientApp registers this dispatcher and it picks the protocol's mod from the run's config
(sent by the server with every message). Training code never knows which protocol runs.

It is also where the data owner's policy (`fedstack.policy.NodePolicy`, from the node's own
config) meets every message: the node refuses an aggregation it did not agree to
(`require-aggregation`) with a fixed reason code, and under secagg / he the replies carry in
the clear only the metrics the policy allows (`clear-metrics`) plus the few the protocol
cannot work without (`PROTOCOL_CLEAR_METRICS`; docs/policy.md lists them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flwr.app import Context, Error, Message, MessageType, MetricRecord

from fedstack.config import ConfigError, config_from_message
from fedstack.log import logger
from fedstack.policy import (
    DP_NONE,
    POLICY_REFUSED_CODE,
    REQUIRE_AGGREGATION_KEY,
    NodePolicy,
    PolicyError,
    PolicyRefusal,
    node_policy,
    refusal_reply,
)
from fedstack.strategies import load_object
from fedstack.strategies.reply_validation import DECLINED_KEY, NUM_EXAMPLES_KEY

__all__ = ["BAD_CONFIG_CODE", "POLICY_REFUSED_CODE", "PROTOCOL_MODS", "REQUIRE_AGGREGATION_KEY",
           "clear_reply", "protocol_mod"]

#: Client-side mod of each aggregation that needs one (fedavg needs none).
PROTOCOL_MODS: dict[str, str] = {
    "secagg": "fedstack.strategies.secagg.mod:secagg_mod",
    "he": "fedstack.strategies.he.mod:he_mod",
}
#: Aggregations under which replies are filtered by the policy's `clear-metrics` (under
#: fedavg the update itself leaves in the clear, so filtering its metrics would hide nothing).
FILTERED_AGGREGATIONS = frozenset(PROTOCOL_MODS)
#: Metrics a protocol needs in the clear to work, whatever `clear-metrics` says, by
#: (aggregation, message type). HE: the server bounds each reply's weight before adding it
#: (train), and federated evaluation is the run's only accuracy, since the server cannot
#: decrypt the model (evaluate). Secagg needs none: its weight travels inside the masked sum.
PROTOCOL_CLEAR_METRICS: Mapping[tuple[str, str], frozenset[str]] = {
    ("he", MessageType.TRAIN): frozenset({NUM_EXAMPLES_KEY}),
    ("he", MessageType.EVALUATE): frozenset({NUM_EXAMPLES_KEY, "eval-loss", "eval-accuracy"}),
}
#: A decline (e.g. DP budget spent) keeps its marker and its zero weight: the server must
#: tell a decline from a failure, and neither value depends on the data.
DECLINE_METRICS = frozenset({DECLINED_KEY, NUM_EXAMPLES_KEY})
#: Error code of a message whose configuration cannot be used.
BAD_CONFIG_CODE = 4000

CallNext = Callable[[Message, Context], Message]


def _declined(metrics: Mapping[str, object]) -> bool:
    return metrics.get(DECLINED_KEY) == 1 and metrics.get(NUM_EXAMPLES_KEY, 0) == 0


def clear_reply(reply: Message, policy: NodePolicy, aggregation: str,
                message_type: str) -> Message:
    """Drop from the reply's metric records what the policy keeps on the node."""
    if aggregation not in FILTERED_AGGREGATIONS or reply.has_error():
        return reply
    required = PROTOCOL_CLEAR_METRICS.get((aggregation, message_type), frozenset())
    records = reply.content.metric_records
    for name in list(records.keys()):
        metrics = dict(records[name])
        keep = required | (DECLINE_METRICS if _declined(metrics) else frozenset())
        records[name] = MetricRecord(policy.clear(metrics, keep))
    return reply


def protocol_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Dispatch to the configured aggregation's mod after checking the node's policy."""
    try:
        cfg = config_from_message(msg, context)
    except ConfigError as exc:
        logger.error("refusing message %s: %s", msg.metadata.message_type, exc)
        return Message(Error(code=BAD_CONFIG_CODE, reason=f"bad run configuration: {exc}"),
                       reply_to=msg)
    try:
        policy = node_policy(context)
    except PolicyError as exc:  # fail closed: a node whose policy cannot be read takes no part
        return refusal_reply(msg, PolicyRefusal("misconfigured", str(exc)))
    name = str(cfg.aggregation.name)
    try:
        policy.check_aggregation(name)
        if msg.metadata.message_type == MessageType.TRAIN and str(cfg.dp.name) == DP_NONE:
            # A node that requires DP refuses to train without it; the DP trainers check the
            # noise floor and budget themselves (they know sigma and epsilon).
            policy.check_dp(name=DP_NONE, noise_multiplier=None, epsilon=None)
    except PolicyRefusal as refusal:
        return refusal_reply(msg, refusal)
    mod_path = PROTOCOL_MODS.get(name)
    if mod_path is None:
        return call_next(msg, context)
    reply = load_object(mod_path)(msg, context, call_next)
    return clear_reply(reply, policy, name, msg.metadata.message_type)
