"""Audit mode: keep exactly what the server sent and received in one round, and what it
computed from it, so that attacks run on the server's real view.

Why record messages rather than "the updates": what the server holds differs per stack
(plaintext updates under fedavg and dp=local, masked ring vectors plus the unmasked sum under
secagg, ciphertexts under he). Recording every message of every exchange of the chosen round
(train, evaluation, protocol stages) in Flower's own serialisation keeps the view exact and
stack-agnostic; `ServerView` then extracts what each attack needs from it.

Layout of `<run_dir>/audit/round_<N>/`:

- `manifest.json`: one entry per message (phase, direction, node, message type, error, and
  per record its kind and file), the aggregate the strategy computed, the run's stack;
- `records/<sha256>.pb`: each record (ArrayRecord, MetricRecord, ConfigRecord) serialised with
  Flower's protobuf serde, stored once per distinct content (the global model sent to k nodes
  is one file) -- the file name is the SHA-256 of its bytes, so tampering is detectable;
- `computed.npz`: arrays the strategy computed from the replies that are not themselves a
  message (secagg: the ring sum and its decoding), if any.

Only the server's ledger identity query (a separate exchange outside the strategy's
`exchange`) is not recorded; it carries partition ids, which train replies carry too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

#: Subdirectory of the run directory holding audit material.
AUDIT_DIR = "audit"
MANIFEST_FILE = "manifest.json"
RECORDS_DIR = "records"
COMPUTED_FILE = "computed.npz"
#: Format tag of the manifest (bump when its meaning changes).
VIEW_FORMAT = "fedstack-server-view/1"
SENT, RECEIVED = "sent", "received"
#: Record kinds in the manifest.
KIND_ARRAY, KIND_METRIC, KIND_CONFIG = "array", "metric", "config"
#: Name of the exchange phase that carries the training replies (fedstack.strategies.fedavg).
TRAIN_PHASE = "train"


def round_dir(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / AUDIT_DIR / f"round_{server_round}"


def _record_bytes(name: str, record: Any) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(RecordDict({name: record})).SerializeToString()


def _record_from_bytes(data: bytes) -> tuple[str, Any]:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    content = recorddict_from_proto(proto)
    ((name, record),) = content.items()
    return name, record


def _kind(record: Any) -> str:
    if isinstance(record, ArrayRecord):
        return KIND_ARRAY
    if isinstance(record, MetricRecord):
        return KIND_METRIC
    if isinstance(record, ConfigRecord):
        return KIND_CONFIG
    raise TypeError(f"unexpected record type {type(record).__name__}")


class ServerViewRecorder:
    """Writes the chosen round's messages as they pass (a `ViewRecorder` of the strategy)
    and is a `RoundListener` of the run recorder (its summary fields say audit mode was on).

    Writing as each exchange returns keeps memory flat: nothing is held beyond one message.
    """

    def __init__(self, run_dir: Path, record_round: int, *, aggregation: str, dp: str,
                 task: str) -> None:
        self.run_dir = Path(run_dir)
        self.record_round = int(record_round)
        self.dir = round_dir(self.run_dir, self.record_round)
        self.meta = {"aggregation": aggregation, "dp": dp, "task": task}
        self.messages: list[dict[str, Any]] = []
        self.aggregate: dict[str, Any] | None = None
        self.complete = False

    @classmethod
    def attach(cls, strategy: Any, run_dir: Path, cfg: Any) -> ServerViewRecorder | None:
        """Register a recorder on `strategy` when `audit.record_round` is set (else None)."""
        record_round = cfg.audit.record_round
        if record_round is None:
            return None
        recorder = cls(run_dir, int(record_round), aggregation=str(cfg.aggregation.name),
                       dp=str(cfg.dp.name), task=str(cfg.task.name))
        strategy.view_recorders.append(recorder)
        return recorder

    # -- storage ------------------------------------------------------------------------
    def _store(self, name: str, record: Any) -> dict[str, Any]:
        data = _record_bytes(name, record)
        digest = hashlib.sha256(data).hexdigest()
        path = self.dir / RECORDS_DIR / f"{digest}.pb"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return {"name": name, "kind": _kind(record), "file": f"{RECORDS_DIR}/{digest}.pb",
                "bytes": len(data)}

    def _entry(self, phase: str, direction: str, msg: Message, node: int) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "phase": phase, "direction": direction, "node": int(node),
            "message_type": str(msg.metadata.message_type), "error": None, "records": []}
        if msg.has_error():
            entry["error"] = {"code": int(msg.error.code), "reason": str(msg.error.reason)}
            return entry
        entry["records"] = [self._store(name, record) for name, record in msg.content.items()]
        return entry

    def _write_manifest(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"format": VIEW_FORMAT, "round": self.record_round, **self.meta,
                "complete": self.complete, "messages": self.messages,
                "aggregate": self.aggregate}
        tmp = self.dir / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.dir / MANIFEST_FILE)

    # -- ViewRecorder -------------------------------------------------------------------
    def on_send(self, server_round: int, phase: str, sent: list[Message]) -> None:
        """Record what is about to be sent (before the runtime may serialise or consume it)."""
        if server_round != self.record_round:
            return
        for msg in sent:
            self.messages.append(self._entry(phase, SENT, msg, msg.metadata.dst_node_id))
        self._write_manifest()

    def on_receive(self, server_round: int, phase: str, sent: list[Message],
                   replies: list[Message]) -> None:
        """Record the replies as they arrived, before the strategy looks at them."""
        if server_round != self.record_round:
            return
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        for msg in replies:
            # An error reply the SuperLink sends for an unreachable node names the node the
            # request went to; a client's own reply names its sender.
            node = (dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
                    if msg.has_error() else msg.metadata.src_node_id)
            self.messages.append(self._entry(phase, RECEIVED, msg, node))
        self._write_manifest()

    def on_aggregate(self, server_round: int, arrays: ArrayRecord | None,
                     metrics: MetricRecord | None,
                     computed: dict[str, np.ndarray] | None) -> None:
        if server_round != self.record_round:
            return
        aggregate: dict[str, Any] = {"records": [], "computed": None}
        if arrays is not None:
            aggregate["records"].append(self._store("arrays", arrays))
        if metrics is not None:
            aggregate["records"].append(self._store("metrics", metrics))
        if computed:
            self.dir.mkdir(parents=True, exist_ok=True)
            np.savez(self.dir / COMPUTED_FILE, **{k: np.asarray(v) for k, v in computed.items()})
            aggregate["computed"] = {"file": COMPUTED_FILE, "arrays": sorted(computed)}
        self.aggregate = aggregate
        self._write_manifest()

    # -- RoundListener ------------------------------------------------------------------
    def on_round(self, record: dict[str, Any], round_log: Any) -> None:
        if int(round_log.server_round) == self.record_round:
            self.complete = True
            self._write_manifest()

    def summary_fields(self) -> dict[str, Any]:
        return {"audit_record_round": self.record_round,
                "audit_view": str(self.dir.relative_to(self.run_dir)) if self.complete
                else None}

    def finish(self) -> None:
        pass


# --------------------------------------------------------------------------- reading


@dataclass
class ViewMessage:
    """One recorded message, with its records loaded on demand."""

    phase: str
    direction: str
    node: int
    message_type: str
    error: dict[str, Any] | None
    records: list[dict[str, Any]]
    base: Path = field(repr=False)

    def record(self, name: str) -> Any:
        for entry in self.records:
            if entry["name"] == name:
                return load_record(self.base, entry)
        raise KeyError(f"{self.direction} {self.phase} message of node {self.node} has no "
                       f"record {name!r} (it has {[e['name'] for e in self.records]})")

    def has(self, name: str) -> bool:
        return any(e["name"] == name for e in self.records)


def load_record(base: Path, entry: dict[str, Any]) -> Any:
    """A stored record, checked against its content address."""
    data = (base / entry["file"]).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if Path(entry["file"]).stem != digest:
        raise ValueError(f"{base / entry['file']}: content does not match its SHA-256 name "
                         "(the recorded view was altered)")
    name, record = _record_from_bytes(data)
    if name != entry["name"]:
        raise ValueError(f"{base / entry['file']}: holds record {name!r}, manifest says "
                         f"{entry['name']!r}")
    return record


class ServerView:
    """A recorded round, read back: what the server sent, received and computed."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        manifest = json.loads((self.dir / MANIFEST_FILE).read_text())
        if manifest.get("format") != VIEW_FORMAT:
            raise ValueError(f"{self.dir / MANIFEST_FILE}: unknown format "
                             f"{manifest.get('format')!r}")
        self.manifest = manifest
        self.round = int(manifest["round"])
        self.aggregation = str(manifest["aggregation"])
        self.dp = str(manifest["dp"])
        self.task = str(manifest["task"])
        self.complete = bool(manifest.get("complete"))
        self.messages = [ViewMessage(m["phase"], m["direction"], int(m["node"]),
                                     m["message_type"], m["error"], m["records"], self.dir)
                         for m in manifest["messages"]]

    @classmethod
    def of_run(cls, run_dir: Path, server_round: int | None = None) -> ServerView:
        """The recorded view of `server_round` (default: the only one recorded)."""
        base = Path(run_dir) / AUDIT_DIR
        if server_round is None:
            rounds = sorted(base.glob("round_*/" + MANIFEST_FILE)) if base.is_dir() else []
            if not rounds:
                raise FileNotFoundError(f"{run_dir}: no recorded server view (run with "
                                        "audit.record_round=N to record one)")
            return cls(rounds[-1].parent)
        return cls(round_dir(Path(run_dir), server_round))

    def select(self, *, phase: str | None = None, direction: str | None = None
               ) -> Iterator[ViewMessage]:
        for msg in self.messages:
            if (phase is None or msg.phase == phase) and (direction is None
                                                          or msg.direction == direction):
                yield msg

    def train_replies(self) -> dict[int, ViewMessage]:
        """node -> its train reply (error replies left out)."""
        return {m.node: m for m in self.select(phase=TRAIN_PHASE, direction=RECEIVED)
                if m.error is None}

    def global_model(self) -> ArrayRecord:
        """The `arrays` record the train messages carried (the model the clients received);
        every node received the same one, which is checked."""
        files = {e["file"] for m in self.select(phase=TRAIN_PHASE, direction=SENT)
                 for e in m.records if e["name"] == "arrays"}
        if len(files) != 1:
            raise ValueError(f"{self.dir}: the train messages carried {len(files)} distinct "
                             "global models (expected exactly one)")
        sent = next(self.select(phase=TRAIN_PHASE, direction=SENT))
        return sent.record("arrays")

    def aggregate_record(self, name: str) -> Any:
        aggregate = self.manifest.get("aggregate") or {}
        for entry in aggregate.get("records", []):
            if entry["name"] == name:
                return load_record(self.dir, entry)
        raise KeyError(f"{self.dir}: no aggregate record {name!r}")

    def computed(self) -> dict[str, np.ndarray]:
        """What the strategy computed beyond the model (secagg: the unmasked sum)."""
        aggregate = self.manifest.get("aggregate") or {}
        info = aggregate.get("computed")
        if not info:
            return {}
        with np.load(self.dir / info["file"], allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
