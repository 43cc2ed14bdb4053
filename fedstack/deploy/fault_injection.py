"""Test-only ClientApp that can send malformed updates, switched on per node.

A SuperNode whose node config has `fedstack-fault=<kind>` (or `fedstack-fault-file=<path>`
holding the kind, so a test can change it between runs of one long-lived SuperNode) tampers
with every reply of its train handler/protocol mod that carries arrays:

    nan      the first float array of the update becomes NaN
    shape    the first array loses its last element (wrong shape)
    garbage  the largest array of each record (the payload: ciphertext blob, masked words
             or the biggest weight tensor) becomes random bytes of the same size, dtype and
             shape; the small metadata arrays beside it stay intact, so the receiver must
             notice the payload itself
    none     no tampering

Every other node behaves exactly like `fedstack.client_app:app`. The app is used only by
the deployment tests (through a separate FAB, see `fault_app_dir`), never by a real run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedstack.client_app import evaluate, train
from fedstack.log import logger
from fedstack.strategies.client_mods import CallNext, protocol_mod

#: Node-config keys that switch a fault on.
FAULT_KEY = "fedstack-fault"
FAULT_FILE_KEY = "fedstack-fault-file"
FAULT_KINDS = ("none", "nan", "shape", "garbage")


def fault_kind(context: Context) -> str:
    kind = context.node_config.get(FAULT_KEY)
    path = context.node_config.get(FAULT_FILE_KEY)
    if kind is None and path:
        try:
            kind = Path(str(path)).read_text().strip()
        except OSError:
            kind = "none"
    kind = str(kind or "none")
    if kind not in FAULT_KINDS:
        raise ValueError(f"{FAULT_KEY}={kind!r}: choose one of {', '.join(FAULT_KINDS)}")
    return kind


def _tamper_record(record: ArrayRecord, kind: str) -> ArrayRecord:
    out: dict[str, Array] = {}
    first = True
    largest = max(record, key=lambda n: record[n].numpy().nbytes) if len(record) else None
    for name in record:
        values = record[name].numpy()
        if kind == "nan" and first and np.issubdtype(values.dtype, np.floating):
            values = np.full_like(values, np.nan)
            first = False
        elif kind == "shape" and first:
            values = values.reshape(-1)[:-1].copy()
            first = False
        elif kind == "garbage" and name == largest:
            raw = np.frombuffer(os.urandom(values.nbytes), dtype=np.uint8)
            values = raw.view(values.dtype).reshape(values.shape).copy()
        out[name] = Array(np.ascontiguousarray(values))
    return ArrayRecord(out)


def fault_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Outermost mod: let the real stack answer, then spoil the arrays of the reply."""
    reply = call_next(msg, context)
    kind = fault_kind(context)
    if kind == "none" or reply.has_error() or not reply.content.array_records:
        return reply
    for name in list(reply.content.array_records.keys()):
        reply.content.array_records[name] = _tamper_record(
            reply.content.array_records[name], kind)
    logger.warning("fault injection: node %s sent a %s update (%s)", context.node_id, kind,
                   msg.metadata.message_type)
    return reply


app = ClientApp()
app.train(mods=[fault_mod, protocol_mod])(train)
app.evaluate(mods=[protocol_mod])(evaluate)

#: The component line of the real app, swapped for this module's app in the test FAB.
CLIENTAPP_LINE = 'clientapp = "fedstack.client_app:app"'


def fault_app_dir(repo_root: Path, dest: Path) -> Path:
    """A Flower app directory whose ClientApp is this module's `app` (code from the install).

    Only pyproject.toml differs from the real app; the FAB carries no code, so every
    process imports fedstack from the environment, exactly the code under test.
    """
    text = (repo_root / "pyproject.toml").read_text()
    if CLIENTAPP_LINE not in text:
        raise RuntimeError(f"{repo_root}/pyproject.toml has no line {CLIENTAPP_LINE!r}")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(text.replace(
        CLIENTAPP_LINE, 'clientapp = "fedstack.deploy.fault_injection:app"'))
    (dest / "README.md").write_text("fedstack with a fault-injecting ClientApp (tests only)\n")
    return dest
