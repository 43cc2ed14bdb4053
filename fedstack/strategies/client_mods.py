"""The client side of every aggregation protocol, as one ClientApp mod.

Flower binds mods when the ClientApp is defined, before any configuration exists, so the
ClientApp registers this dispatcher and it picks the protocol's mod from the run's config
(sent by the server with every message). Training code never knows which protocol runs.

It also enforces a data owner's own policy from its node config: `require-aggregation`
(e.g. "secagg" or "he", or a comma-separated list) makes the node refuse any round whose
aggregation would expose its update in a way it did not agree to.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Error, Message

from fedstack.config import ConfigError, config_from_message
from fedstack.log import logger
from fedstack.strategies import load_object

#: Client-side mod of each aggregation that needs one (fedavg needs none).
PROTOCOL_MODS: dict[str, str] = {
    "secagg": "fedstack.strategies.secagg.mod:secagg_mod",
    "he": "fedstack.strategies.he.mod:he_mod",
}
#: Node-config key: aggregations this data owner accepts (comma-separated).
REQUIRE_AGGREGATION_KEY = "require-aggregation"
#: Error code of a reply refused by the node's own policy.
POLICY_REFUSED_CODE = 4010
#: Error code of a message whose configuration cannot be used.
BAD_CONFIG_CODE = 4000

CallNext = Callable[[Message, Context], Message]


def required_aggregations(context: Context) -> set[str] | None:
    value = context.node_config.get(REQUIRE_AGGREGATION_KEY)
    if value in (None, ""):
        return None
    return {part.strip() for part in str(value).split(",") if part.strip()}


def protocol_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Dispatch to the configured aggregation's mod after checking the node's policy."""
    try:
        cfg = config_from_message(msg, context)
    except ConfigError as exc:
        logger.error("refusing message %s: %s", msg.metadata.message_type, exc)
        return Message(Error(code=BAD_CONFIG_CODE, reason=f"bad run configuration: {exc}"),
                       reply_to=msg)
    name = str(cfg.aggregation.name)
    allowed = required_aggregations(context)
    if allowed is not None and name not in allowed:
        reason = (f"node policy {REQUIRE_AGGREGATION_KEY}={','.join(sorted(allowed))} refuses "
                  f"aggregation={name}")
        logger.warning("refusing %s: %s", msg.metadata.message_type, reason)
        return Message(Error(code=POLICY_REFUSED_CODE, reason=reason), reply_to=msg)
    mod_path = PROTOCOL_MODS.get(name)
    if mod_path is None:
        return call_next(msg, context)
    return load_object(mod_path)(msg, context, call_next)
