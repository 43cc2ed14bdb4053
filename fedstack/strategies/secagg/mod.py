"""Client side of ``aggregation=secagg``: a ClientApp mod around the train handler.

The train handler never learns about masking: the mod answers protocol stages itself and,
on the masked-input stage, calls the handler, flattens the weights it returns, quantises
``(n_k * w_k, n_k)``, masks the result and replies with the masked words only -- never the
plaintext weights, never n_k, never the train loss. Every request part is decoded and
validated (stage, round, sizes, ids) before use; a bad request gets an error reply and
leaves the node's protocol state untouched. The state lives in ``context.state`` as bytes,
so each message may run in a fresh process.
"""

from __future__ import annotations

from collections.abc import Callable
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
from fedstack.crypto.quantise import QuantisationError
from fedstack.log import logger
from fedstack.strategies.model_layout import ModelLayout
from fedstack.strategies.reply_validation import DECLINE_RECORD, NUM_EXAMPLES_KEY, decline_reason

from . import wire
from .client import ClientState, SecAggClient, new_client_state
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


def _refuse(msg: Message, reason: str) -> Message:
    logger.warning("secagg: node %s refuses the request: %s", msg.metadata.dst_node_id, reason)
    return Message(Error(code=REFUSED_CODE, reason=f"secagg: {reason}"), reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Answer protocol stages; wrap the train handler on the masked-input stage."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)  # evaluation of the (public) global model
    record = msg.content.config_records.get(SECAGG_RECORD)
    if record is None:
        return _refuse(
            msg, "train message without secagg parts: refusing to send an unmasked update"
        )
    request = dict(record)
    try:
        client = SecAggClient(
            protocol_params(config_from_message(msg, context)), load_state(context)
        )
        out: wire.Wire = {}
        extra: dict[str, Any] = {}
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
    except (ProtocolViolation, ValueError) as exc:
        return _refuse(msg, str(exc))
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
            f"mask request for round {req.round_num} in a train message of round {server_round}"
        )
    if "arrays" not in msg.content.array_records:
        raise ProtocolViolation("masked-input request without the global model")
    layout = ModelLayout.of(msg.content.array_records["arrays"])
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # any training failure is this round's dropout, not a crash:
        # the reply still carries the keys for the next round
        out[wire.FAILED] = f"train handler raised {type(exc).__name__}: {exc}"
        return {}
    if reply.has_error():
        out[wire.FAILED] = f"train handler error {reply.error.code}: {reply.error.reason}"
        return {}
    if decline_reason(reply) is not None:  # e.g. DP budget spent: forward the decline as is
        out[wire.FAILED] = "declined"
        extra: dict[str, Any] = {"metrics": reply.content.metric_records["metrics"]}
        if DECLINE_RECORD in reply.content.config_records:
            extra[DECLINE_RECORD] = reply.content.config_records[DECLINE_RECORD]
        return extra
    metrics = reply.content.metric_records["metrics"]
    arrays = reply.content.array_records["arrays"]
    if ModelLayout.of(arrays) != layout:
        out[wire.FAILED] = (
            "train handler returned arrays that differ from the global model's layout"
        )
        return {}
    try:
        masked = client.mask(req, layout.flatten(arrays), int(metrics[NUM_EXAMPLES_KEY]))
    except QuantisationError as exc:
        out[wire.FAILED] = f"cannot encode the update: {exc}"
        return {}
    out[wire.MASKED] = req.round_num
    public = {k: metrics[k] for k in PUBLIC_METRICS if k in metrics}
    return {
        MASKED_RECORD: ArrayRecord({MASKED_ARRAY: Array(masked.words)}),
        "metrics": MetricRecord(public),
    }
