"""The client side of `aggregation=he`: a ClientApp mod around the train and evaluate handlers.

Incoming: an encrypted global model is decrypted with the node's secret context, verified
(check slots and bounds, `ckks.decrypt_mean`) and divided by its decrypted total weight; the
plain handler then sees an ordinary plaintext model (round 1 carries the plaintext initial
model, which every client can derive from the seed anyway). A model that fails verification
is answered with error `HE_UNDECRYPTABLE_CODE` and a fixed reason: the server then rolls the
round back and looks for the bad reply.
Outgoing (train): the trained weights are flattened in the global model's layout, pre-scaled by
the number of examples and encrypted together with it; the reply carries only ciphertexts
plus the metrics the handler produced, which `protocol_mod` (strategies/client_mods.py) then
cuts down to the node policy's `clear-metrics` and `num-examples` (docs/policy.md). Declines
and errors pass through unchanged.
Check requests (evaluate messages with a `check` entry) are answered by the mod alone, without
running the handler: "model" (decrypt the round's new global model) or "group" (decrypt the sum
of a group of the round's replies for the server's search, `group_test`). Before decrypting a
group the client applies the group-testing rules itself, with the groups it already tested
this round (kept in its node state): never its own reply, never fewer than two replies, never
a group that would let it isolate one reply. It answers one bit and keeps nothing decrypted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict

from fedstack.config import config_from_message, settings_of
from fedstack.log import logger
from fedstack.strategies.he.ckks import (
    AggregateCheckError,
    CiphertextError,
    EncryptedVector,
    decrypt_mean,
    encrypt_update,
)
from fedstack.strategies.he.group_test import group_violation
from fedstack.strategies.he.keys import HEKeyError, SecretContext
from fedstack.strategies.he.messages import (
    CHECK_GROUP,
    CHECK_KEY,
    CHECK_MEMBERS_KEY,
    CHECK_MODEL,
    CHECK_OK_KEY,
    CHECK_REPLIES_KEY,
    CHECK_REPLY_RECORD,
    CHECK_ROUND_KEY,
    ENCRYPT_REASON,
    FINGERPRINT_KEY,
    HE_CHECK_REFUSED_CODE,
    HE_CIPHERTEXT_ERROR_CODE,
    HE_ENCRYPT_ERROR_CODE,
    HE_KEY_ERROR_CODE,
    HE_RECORD,
    HE_UNDECRYPTABLE_CODE,
    SIMULATION_SECRET_KEY,
    UNDECRYPTABLE_REASON,
)
from fedstack.strategies.he.provisioning import client_secret_context
from fedstack.strategies.he.records import (
    ArrayLayout,
    encrypted_to_record,
    is_encrypted_model,
    model_from_record,
)
from fedstack.strategies.reply_validation import NUM_EXAMPLES_KEY

__all__ = [
    "HE_CHECK_REFUSED_CODE",
    "HE_CIPHERTEXT_ERROR_CODE",
    "HE_ENCRYPT_ERROR_CODE",
    "HE_KEY_ERROR_CODE",
    "HE_UNDECRYPTABLE_CODE",
    "he_mod",
]

#: Node-state keys of the last decrypted global model and of its ciphertexts' digest (one
#: RecordDict namespace for every record type, hence two names).
PLAIN_CACHE_KEY = "fedstack.he.plain"
PLAIN_DIGEST_KEY = "fedstack.he.plain-digest"
#: Node-state record of the groups this node tested (round, JSON list of member lists).
TESTED_GROUPS_KEY = "fedstack.he.tested-groups"

CallNext = Callable[[Message, Context], Message]


def _error(msg: Message, code: int, reason: str) -> Message:
    logger.error("HE: %s", reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _decrypted(context: Context, ctx: SecretContext, encrypted: EncryptedVector,
               layout: ArrayLayout, settings: Any) -> ArrayRecord:
    """The plaintext global model, decrypted (and verified) once per aggregate.

    A node usually gets the same aggregate twice (evaluate after round r, train in round
    r+1), so the last decrypted model is kept in the node's own state, keyed by the
    ciphertexts' digest. It never leaves the node.
    """
    digest = encrypted.digest() + ":" + ctx.fingerprint
    cached = context.state.config_records.get(PLAIN_DIGEST_KEY)
    if cached is not None and cached.get("digest") == digest:
        cached_arrays = context.state.array_records.get(PLAIN_CACHE_KEY)
        if cached_arrays is not None:
            return ArrayRecord({k: cached_arrays[k] for k in cached_arrays})
    mean = _verified_mean(ctx, encrypted, settings)
    plain = layout.unflatten(mean)
    context.state.array_records[PLAIN_CACHE_KEY] = plain
    context.state.config_records[PLAIN_DIGEST_KEY] = ConfigRecord({"digest": digest})
    return ArrayRecord({k: plain[k] for k in plain})


def _verified_mean(ctx: SecretContext, encrypted: EncryptedVector, settings: Any) -> Any:
    """decrypt_mean with the run's bounds; AggregateCheckError if the sum fails them."""
    return decrypt_mean(ctx, encrypted, scale_bits=settings.effective_scale_bits(),
                        max_weight=int(settings.max_weight),
                        max_abs_value=float(settings.max_abs_value)).mean


def he_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Decrypt the incoming global model; encrypt the outgoing update (train); answer checks."""
    cfg = config_from_message(msg, context)
    settings = settings_of(cfg.aggregation)
    content = msg.content
    he_record = content.config_records.get(HE_RECORD)
    announced = he_record.get(SIMULATION_SECRET_KEY) if he_record is not None else None
    try:
        ctx, source = client_secret_context(settings, context.node_config,
                                            str(announced) if announced else None)
    except HEKeyError as exc:
        return _error(msg, HE_KEY_ERROR_CODE, str(exc))
    expected = he_record.get(FINGERPRINT_KEY) if he_record is not None else None
    if expected is not None and expected != ctx.fingerprint:
        return _error(msg, HE_KEY_ERROR_CODE,
                      f"the server runs with key {str(expected)[:12]}…, this node holds "
                      f"{ctx.fingerprint[:12]}… ({source})")
    if "arrays" not in content.array_records:
        return _error(msg, HE_CIPHERTEXT_ERROR_CODE, "message without a global model")
    if he_record is not None and CHECK_KEY in he_record:
        return _answer_check(msg, context, ctx, settings, he_record)
    arrays = content.array_records["arrays"]
    if is_encrypted_model(arrays):
        try:
            encrypted, layout = model_from_record(arrays)
            content.array_records["arrays"] = _decrypted(context, ctx, encrypted, layout,
                                                        settings)
        except AggregateCheckError as exc:
            logger.error("HE: the global model fails verification: %s", exc)
            return _error(msg, HE_UNDECRYPTABLE_CODE, UNDECRYPTABLE_REASON)
        except (CiphertextError, HEKeyError, ValueError) as exc:
            return _error(msg, HE_CIPHERTEXT_ERROR_CODE,
                          f"cannot decrypt the global model: {exc}")
    else:
        layout = ArrayLayout.of(arrays)
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    if "arrays" not in reply.content.array_records:
        return reply  # a decline: nothing to encrypt
    try:
        values = layout.flatten(reply.content.array_records["arrays"])
        weight = reply.content.metric_records["metrics"][NUM_EXAMPLES_KEY]
        encrypted_reply = encrypt_update(
            ctx, values, int(weight), scale_bits=settings.effective_scale_bits(),
            max_abs_value=float(settings.max_abs_value),
            max_weight=int(settings.max_weight), seeded=bool(settings.seeded),
        )
    except (ValueError, KeyError) as exc:
        logger.error("HE: cannot encrypt the update: %s", exc)
        return _error(msg, HE_ENCRYPT_ERROR_CODE, ENCRYPT_REASON)
    reply.content.array_records["arrays"] = encrypted_to_record(encrypted_reply)
    return reply


# ---------------------------------------------------------------------- check requests


def _node_list(value: Any) -> list[int] | None:
    """A JSON list of node ids from a check request, or None if malformed."""
    try:
        nodes = json.loads(str(value))
    except ValueError:
        return None
    if not isinstance(nodes, list) or not all(isinstance(n, int) for n in nodes):
        return None
    return nodes


def _answer_check(msg: Message, context: Context, ctx: SecretContext, settings: Any,
                  he_record: ConfigRecord) -> Message:
    """Decrypt what the server asks to verify; reply one bit (pass/fail), nothing else."""
    kind = he_record.get(CHECK_KEY)
    if msg.metadata.message_type != MessageType.EVALUATE or kind not in (CHECK_MODEL,
                                                                         CHECK_GROUP):
        return _error(msg, HE_CHECK_REFUSED_CODE, "malformed HE check request")
    arrays = msg.content.array_records["arrays"]
    try:
        encrypted, layout = model_from_record(arrays)
    except (CiphertextError, ValueError) as exc:
        return _error(msg, HE_CIPHERTEXT_ERROR_CODE, f"malformed HE check request: {exc}")
    if kind == CHECK_GROUP:
        refusal = _refuse_group(context, he_record, encrypted)
        if refusal is not None:
            return _error(msg, HE_CHECK_REFUSED_CODE, f"group test refused: {refusal}")
    try:
        if kind == CHECK_MODEL:
            _decrypted(context, ctx, encrypted, layout, settings)  # cached for next round
        else:
            _verified_mean(ctx, encrypted, settings)  # nothing is kept
        ok = True
    except AggregateCheckError as exc:
        logger.warning("HE: a checked sum fails verification: %s", exc)
        ok = False
    except (CiphertextError, HEKeyError, ValueError) as exc:
        return _error(msg, HE_CIPHERTEXT_ERROR_CODE, f"cannot decrypt the checked sum: {exc}")
    return Message(RecordDict({CHECK_REPLY_RECORD: ConfigRecord({CHECK_OK_KEY: ok})}),
                   reply_to=msg)


def _refuse_group(context: Context, he_record: ConfigRecord,
                  encrypted: EncryptedVector) -> str | None:
    """Apply the group-testing rules to a request; remember the group if it is allowed."""
    members = _node_list(he_record.get(CHECK_MEMBERS_KEY))
    replies = _node_list(he_record.get(CHECK_REPLIES_KEY))
    server_round = he_record.get(CHECK_ROUND_KEY)
    if members is None or replies is None or not isinstance(server_round, int):
        return "malformed group description"
    if encrypted.num_terms != len(members):
        return "the ciphertext does not sum as many replies as the group lists"
    record = context.state.config_records.get(TESTED_GROUPS_KEY)
    seen: list[list[int]] = []
    if record is not None and record.get("round") == server_round:
        seen = json.loads(str(record["groups"]))
    violation = group_violation(context.node_id, members, replies, seen)
    if violation is not None:
        return violation
    seen.append(sorted(members))
    context.state.config_records[TESTED_GROUPS_KEY] = ConfigRecord(
        {"round": server_round, "groups": json.dumps(seen)})
    return None
