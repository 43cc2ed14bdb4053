"""What happened in one round, as the strategy saw it (written to history.jsonl)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import RecordDict

#: Bytes counted per scalar value in Config/Metric records (a wire-size approximation).
SCALAR_BYTES = 8


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's payload: array buffers, strings/bytes and scalars."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(arr.data) for arr in record.values())
    for record in content.config_records.values():
        for value in record.values():
            total += _value_bytes(value)
    for record in content.metric_records.values():
        for value in record.values():
            total += _value_bytes(value)
    return total


def _value_bytes(value: Any) -> int:
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return SCALAR_BYTES


@dataclass
class RoundLog:
    """Per-round bookkeeping shared by every strategy (and the stages of multi-step ones)."""

    server_round: int
    #: Message exchanges (send_and_receive calls) in this round, training and evaluation.
    exchanges: int = 0
    #: Payload bytes sent to clients / received from clients, over every exchange.
    bytes_down: int = 0
    bytes_up: int = 0
    #: Seconds per phase ("train", "evaluate", "central_evaluate", protocol stages ...).
    seconds: dict[str, float] = field(default_factory=dict)
    sampled: list[int] = field(default_factory=list)
    #: node id -> train metrics it reported (e.g. train-loss, epsilon).
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    #: node id -> partition id, where the client told us (for readable reports).
    client_partitions: dict[int, int] = field(default_factory=dict)
    aggregated: list[int] = field(default_factory=list)
    declined: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    #: Set when the round kept the previous model (it failed), with the reason.
    aborted: str | None = None
    #: Rounds whose aggregate was discarded because a reply in it was found bad, and whose
    #: cause was identified and excluded (e.g. a forged HE ciphertext): the run rolled back
    #: to the model before them and goes on. Such a round is also `aborted` (no new model)
    #: but does not count against `max_failed_rounds`.
    rolled_back: list[int] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    central_metrics: dict[str, float] = field(default_factory=dict)
    #: Free-form extras a protocol layer wants in the history (e.g. secagg survivors).
    extra: dict[str, Any] = field(default_factory=dict)

    def add_seconds(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        # JSON object keys must be strings.
        for key in ("client_metrics", "client_partitions", "declined", "rejected"):
            out[key] = {str(k): v for k, v in out[key].items()}
        return out
