"""The client side of `aggregation=he`: a ClientApp mod around the train and evaluate handlers.

Incoming: an encrypted global model is decrypted with the node's secret context and divided
by its decrypted total weight; the plain handler then sees an ordinary plaintext model (round
1 carries the plaintext initial model, which every client can derive from the seed anyway).
Outgoing (train): the trained weights are flattened in the global model's layout, pre-scaled by
the number of examples and encrypted together with it; the reply carries only ciphertexts
(plus the plaintext metrics the handler produced). Declines and errors pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType

from fedstack.config import config_from_message, settings_of
from fedstack.log import logger
from fedstack.strategies.he.ckks import (
    CiphertextError,
    EncryptedVector,
    decrypt_mean,
    encrypt_update,
)
from fedstack.strategies.he.keys import HEKeyError, SecretContext
from fedstack.strategies.he.provisioning import client_secret_context
from fedstack.strategies.he.records import (
    ArrayLayout,
    encrypted_to_record,
    is_encrypted_model,
    model_from_record,
)
from fedstack.strategies.he.strategy import FINGERPRINT_KEY, HE_RECORD, SIMULATION_SECRET_KEY
from fedstack.strategies.reply_validation import NUM_EXAMPLES_KEY

#: Error codes of HE replies a client could not produce.
HE_KEY_ERROR_CODE = 4020
HE_CIPHERTEXT_ERROR_CODE = 4021
HE_ENCRYPT_ERROR_CODE = 4022
#: Node-state keys of the last decrypted global model and of its ciphertexts' digest (one
#: RecordDict namespace for every record type, hence two names).
PLAIN_CACHE_KEY = "fedstack.he.plain"
PLAIN_DIGEST_KEY = "fedstack.he.plain-digest"

CallNext = Callable[[Message, Context], Message]


def _error(msg: Message, code: int, reason: str) -> Message:
    logger.error("HE: %s", reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _decrypted(context: Context, ctx: SecretContext, encrypted: EncryptedVector,
               layout: ArrayLayout, scale_bits: int, max_weight: int) -> ArrayRecord:
    """The plaintext global model, decrypted once per aggregate.

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
    mean = decrypt_mean(ctx, encrypted, scale_bits=scale_bits, max_weight=max_weight)
    plain = layout.unflatten(mean.mean)
    context.state.array_records[PLAIN_CACHE_KEY] = plain
    context.state.config_records[PLAIN_DIGEST_KEY] = ConfigRecord({"digest": digest})
    return ArrayRecord({k: plain[k] for k in plain})


def he_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Decrypt the incoming global model; encrypt the outgoing update (train)."""
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
    scale_bits = settings.effective_scale_bits()
    arrays = content.array_records["arrays"]
    if is_encrypted_model(arrays):
        try:
            encrypted, layout = model_from_record(arrays)
            content.array_records["arrays"] = _decrypted(context, ctx, encrypted, layout,
                                                        scale_bits, int(settings.max_weight))
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
            ctx, values, int(weight), scale_bits=scale_bits,
            max_abs_value=float(settings.max_abs_value),
            max_weight=int(settings.max_weight), seeded=bool(settings.seeded),
        )
    except (ValueError, KeyError) as exc:
        return _error(msg, HE_ENCRYPT_ERROR_CODE, f"cannot encrypt the update: {exc}")
    reply.content.array_records["arrays"] = encrypted_to_record(encrypted_reply)
    return reply
