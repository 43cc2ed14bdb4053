"""Client side of ``aggregation=secagg``: a ClientApp mod around the train handler.

The train handler never learns about masking: the mod answers protocol stages itself and,
on the masked-input stage, calls the handler, flattens the weights it returns, quantises
``(n_k * w_k, n_k)``, masks the result and replies with the masked words only -- never the
plaintext weights, never n_k, never the train loss. Every request part is decoded and
validated (stage, round, sizes, ids) before use; a bad request gets an error reply and
leaves the node's protocol state untouched. The state lives in ``context.state`` as bytes,
so each message may run in a fresh process.

The node's own policy (``fedstack.policy.node_policy``) bounds every round (t, k and the
cohort recomputed here, ``security``), and under ``security=malicious`` the node signs with
its identity and verifies everyone against its own roster (``fedstack.consortium``; a node
that pins none uses the consortium the run proposes -- simulation only). A refusal tells the
server a fixed reason code only; the details go to this node's log. Replies to evaluate
messages keep only the metrics the policy lets leave in the clear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedstack.config import config_from_message, settings_of
from fedstack.consortium import ConsortiumError, consortium_for_unpinned_node
from fedstack.crypto.quantise import QuantisationError
from fedstack.log import logger
from fedstack.policy import NodePolicy, PolicyRefusal, node_policy, refusal_reply
from fedstack.strategies.model_layout import ModelLayout
from fedstack.strategies.reply_validation import DECLINE_RECORD, NUM_EXAMPLES_KEY, decline_reason

from . import wire
from .client import ClientState, ClientTrust, SecAggClient, new_client_state
from .errors import ProtocolViolation
from .params import ProtocolParams

#: ConfigRecord carrying protocol parts, in requests and replies.
SECAGG_RECORD = "secagg"
#: ArrayRecord of a masked-input reply; its single array is the ring words.
MASKED_RECORD = "secagg-masked"
MASKED_ARRAY = "words"
#: Where the protocol state lives in ``context.state``.
STATE_RECORD = "fedstack.secagg"
STATE_KEY = "state"
#: Error code of a request the client refuses.
REFUSED_CODE = 4020
#: Train metrics that may leave the client in the clear (no update-dependent values).
PUBLIC_METRICS = ("partition-id", "epsilon", "delta")

CallNext = Callable[[Message, Context], Message]
#: Fixed codes of a masked-input reply without a masked input (details stay in the node log).
FAILED_CODES = ("train-error", "declined", "layout", "encode")


def _failed(out: wire.Wire, code: str, detail: str) -> dict[str, Any]:
    """Mark this round's masked input as failed with a fixed code; log the detail locally."""
    logger.warning("secagg: no masked input this round (%s): %s", code, detail)
    out[wire.FAILED] = code
    return {}


def load_state(context: Context) -> ClientState:
    record = context.state.config_records.get(STATE_RECORD)
    if record is None:
        return new_client_state(context.node_id)
    state = ClientState.from_bytes(record[STATE_KEY])  # type: ignore[arg-type]
    if state.node != context.node_id:
        raise ProtocolViolation(
            f"stored secagg state belongs to node {state.node}, not {context.node_id}"
        )
    return state


def save_state(context: Context, state: ClientState) -> None:
    context.state.config_records[STATE_RECORD] = ConfigRecord({STATE_KEY: state.to_bytes()})


_PARAMS_CACHE: dict[int, tuple[Any, ProtocolParams]] = {}


def protocol_params(cfg: Any) -> ProtocolParams:
    """The run's protocol parameters; memoised per config object (``config_from_message``
    returns the same parsed object for the same run), as building them goes through OmegaConf."""
    hit = _PARAMS_CACHE.get(id(cfg))
    if hit is not None and hit[0] is cfg:
        return hit[1]
    params = settings_of(cfg.aggregation).protocol(cfg)
    if len(_PARAMS_CACHE) > 8:
        _PARAMS_CACHE.clear()
    _PARAMS_CACHE[id(cfg)] = (cfg, params)
    return params


def refusal_reason(code: str) -> str:
    """What the server reads when this node refuses: a fixed code, nothing from the data."""
    return f"secagg refused: {code}"


def _refuse(msg: Message, code: str, detail: str) -> Message:
    logger.warning("secagg: node %s refuses the request (%s): %s",
                   msg.metadata.dst_node_id, code, detail)
    return Message(Error(code=REFUSED_CODE, reason=refusal_reason(code)), reply_to=msg)


def client_trust(context: Context, params: ProtocolParams, request: dict) -> ClientTrust:
    """This node's policy and, under security=malicious, its identity and roster.

    A node that pins a roster uses only its own; one that pins none uses the consortium
    directory the run proposes (simulation), trusting the run's roster.
    """
    policy = node_policy(context)
    if not params.malicious:
        return ClientTrust(int(context.run_id), policy=policy)
    proposed = request.get(wire.CONSORTIUM)
    try:
        consortium = consortium_for_unpinned_node(
            context, Path(proposed) if isinstance(proposed, str) and proposed else None
        )
    except ConsortiumError as exc:
        raise ProtocolViolation(f"cannot load this node's consortium: {exc}", "identity") from exc
    if consortium is None or consortium.identity is None:
        raise ProtocolViolation(
            "security=malicious but this node has no identity-key/roster in its node config "
            "and the run proposes no consortium", "identity")
    return ClientTrust(int(context.run_id), consortium.identity, consortium.roster, policy)


def _clear_reply(reply: Message, policy: NodePolicy) -> Message:
    """An evaluate reply with only the metrics the node's policy lets leave in the clear."""
    if reply.has_error():
        return reply
    for name, record in list(reply.content.metric_records.items()):
        reply.content.metric_records[name] = MetricRecord(policy.clear(dict(record)))
    return reply


def secagg_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Answer protocol stages; wrap the train handler on the masked-input stage."""
    if msg.metadata.message_type != MessageType.TRAIN:
        # Evaluation of the (public) global model; the strategy sends none under secagg,
        # and a server that does gets only the metrics the node's policy lets through.
        return _clear_reply(call_next(msg, context), node_policy(context))
    record = msg.content.config_records.get(SECAGG_RECORD)
    if record is None:
        return _refuse(msg, "unmasked-train",
                       "train message without secagg parts: refusing to send an unmasked update")
    request = dict(record)
    try:
        params = protocol_params(config_from_message(msg, context))
        client = SecAggClient(params, load_state(context), client_trust(context, params, request))
        out: wire.Wire = {}
        extra: dict[str, Any] = {}
        if wire.CONSISTENCY_REQ in request:
            out.update(wire.encode_consistency_reply(
                client.consistency(wire.decode_consistency_request(request))))
        if wire.REVEAL_REQ in request:
            out.update(wire.encode_reveal_reply(
                client.reveal(wire.decode_reveal_request(request))))
        if wire.UNMASK_REQ in request:
            out.update(wire.encode_unmask_reply(client.unmask(wire.decode_unmask_request(request))))
        if wire.SHARE_REQ in request:
            out.update(wire.encode_share_reply(client.share(wire.decode_share_request(request))))
        if wire.MASK_REQ in request:
            extra = _masked_input(msg, context, call_next, client, request, out)
        if wire.ADVERTISE_REQ in request:
            out.update(
                wire.encode_advert(client.advertise(wire.get_round(request, wire.ADVERTISE_REQ)))
            )
    except PolicyRefusal as exc:
        logger.warning("secagg: node %s: %s (%s)", msg.metadata.dst_node_id, exc.reason,
                       exc.detail)
        return refusal_reply(msg, exc)
    except ProtocolViolation as exc:
        return _refuse(msg, exc.code, str(exc))
    except ValueError as exc:
        return _refuse(msg, "protocol", str(exc))
    save_state(context, client.state)
    return Message(RecordDict({SECAGG_RECORD: ConfigRecord(out), **extra}), reply_to=msg)


def _masked_input(
    msg: Message,
    context: Context,
    call_next: CallNext,
    client: SecAggClient,
    request: dict,
    out: wire.Wire,
) -> dict[str, Any]:
    """Run the train handler and mask its result; a training failure becomes a soft dropout."""
    req = wire.decode_mask_request(request)
    server_round = (
        msg.content.config_records["config"].get("server-round")
        if "config" in msg.content.config_records
        else None
    )
    if req.round_num != server_round:
        raise ProtocolViolation(
            f"mask request for round {req.round_num} in a train message of round {server_round}",
            "stale",
        )
    if "arrays" not in msg.content.array_records:
        raise ProtocolViolation("masked-input request without the global model")
    global_arrays = msg.content.array_records["arrays"]
    layout = ModelLayout.of(global_arrays)
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # any training failure is this round's dropout, not a crash:
        # the reply still carries the keys for the next round
        return _failed(out, "train-error", f"train handler raised {type(exc).__name__}: {exc}")
    if reply.has_error():
        return _failed(
            out, "train-error", f"train handler error {reply.error.code}: {reply.error.reason}"
        )
    if decline_reason(reply) is not None:  # e.g. DP budget spent: forward the decline as is
        out[wire.FAILED] = "declined"
        extra: dict[str, Any] = {"metrics": reply.content.metric_records["metrics"]}
        if DECLINE_RECORD in reply.content.config_records:
            extra[DECLINE_RECORD] = reply.content.config_records[DECLINE_RECORD]
        return extra
    metrics = reply.content.metric_records["metrics"]
    arrays = reply.content.array_records["arrays"]
    if ModelLayout.of(arrays) != layout:
        return _failed(
            out, "layout", "train handler returned arrays unlike the global model's layout"
        )
    codec = client.params.input
    values, weight = layout.flatten(arrays), int(metrics[NUM_EXAMPLES_KEY])
    try:
        masked = client.mask_encoded(
            req,
            lambda ctx: codec.encode(
                values, weight, replace(ctx, global_values=layout.flatten(global_arrays))
            ),
        )
    except QuantisationError as exc:  # e.g. n_k above max_weight: never sent to the server
        return _failed(out, "encode", f"cannot encode the update: {exc}")
    out[wire.MASKED] = req.round_num
    public = client.trust.policy.clear({k: metrics[k] for k in PUBLIC_METRICS if k in metrics})
    return {
        MASKED_RECORD: ArrayRecord({MASKED_ARRAY: Array(masked.words)}),
        "metrics": MetricRecord(public),
    }
