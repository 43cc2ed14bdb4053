"""`aggregation=he`: a FedAvg server that adds CKKS ciphertexts it cannot read.

The server holds a public context only. Each round it sends the global model (plaintext in
round 1: every client already derives the same initial model from the run seed, so it holds
nothing secret; the encrypted sum from round 2 on), validates every encrypted reply (wire
structure, digest, fingerprint, ciphertext count, sizes, SEAL deserialisation, level and scale)
and adds it into one running ciphertext vector. A bad reply is dropped with a log line and
the round carries on with the rest. The encrypted sum is the new global model; it is what
the recorder checkpoints, so a checkpoint is ciphertext as well. Central evaluation is off
(`server_sees_model = False`): federated evaluation on the clients gives the accuracy, and
`fedstack decrypt` gives key holders the plaintext model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedstack.log import logger as log
from fedstack.strategies.fedavg import ValidReply, WeightedFedAvg
from fedstack.strategies.he.ckks import CiphertextError, EncryptedSum
from fedstack.strategies.he.provisioning import ServerKeys, server_keys
from fedstack.strategies.he.records import (
    ArrayLayout,
    encrypted_from_record,
    is_encrypted_model,
    model_from_record,
    model_to_record,
)
from fedstack.strategies.he.settings import HESettings
from fedstack.strategies.model_layout import ModelLayout
from fedstack.strategies.reply_validation import (
    NUM_EXAMPLES_KEY,
    InvalidReply,
    check_num_examples,
)

#: ConfigRecord the server adds to train/evaluate messages.
HE_RECORD = "he"
#: Keys in it: the key fingerprint clients must hold; a simulated run's secret-context path.
FINGERPRINT_KEY = "fingerprint"
SIMULATION_SECRET_KEY = "simulation-secret-context"


class HEFedAvg(WeightedFedAvg):
    """Weighted FedAvg over CKKS ciphertexts; never decrypts (it has no key to)."""

    server_sees_model = False
    visibility = (
        "only CKKS ciphertexts: each client's weighted update and the aggregate (the global "
        "model) stay encrypted under a key the server does not hold; it sees each client's "
        "plaintext train metrics (num-examples, train-loss) and the model's layout"
    )

    def __init__(self, *, settings: HESettings, keys: ServerKeys, **common: Any) -> None:
        super().__init__(**common)
        self.settings = settings
        self.keys = keys
        self.scale_bits = settings.effective_scale_bits()
        self._layout: ArrayLayout | None = None
        self._sum: EncryptedSum | None = None
        #: Facts for the privacy report (the ledger prints `visibility`, so they go there).
        self.privacy_notes = [
            type(self).visibility + ".",
            "Central evaluation is off: the server holds no secret key and cannot read the "
            "model, so accuracy comes from the clients' federated evaluation of the decrypted "
            "model; key holders recover the final model with `fedstack decrypt`.",
        ]
        if keys.one_process_held_both:
            self.privacy_notes.append(
                "Simulation: one process generated both the secret and the public CKKS "
                f"context (into {keys.public_path.parent}); the server strategy loaded only "
                "the public one, but a deployment must create keys on a data owner's machine "
                "(`fedstack keys`) and give the server only the public file."
            )
        self.visibility = " ".join(self.privacy_notes)

    @classmethod
    def from_config(cls, cfg: Any, *, run_dir: Path, **common: Any) -> HEFedAvg:
        from fedstack.config import settings_of

        settings = settings_of(cfg.aggregation)
        keys = server_keys(settings, Path(run_dir))
        log.info(
            "HE: preset %s, scale 2^%s, key %s… (%s)", settings.preset,
            settings.effective_scale_bits(), keys.context.fingerprint[:12],
            "generated for this simulated run" if keys.one_process_held_both
            else f"public context {keys.public_path}",
        )
        return cls(settings=settings, keys=keys, **common)

    def summary(self) -> None:
        super().summary()
        log.info("HEFedAvg: preset=%s scale=2^%s max_clients=%s seeded=%s",
                 self.settings.preset, self.scale_bits, self.settings.max_clients,
                 self.settings.seeded)

    # ------------------------------------------------------------------ messages

    def _he_record(self) -> ConfigRecord:
        record = ConfigRecord({FINGERPRINT_KEY: self.keys.context.fingerprint})
        if self.keys.simulation_secret_path is not None:
            record[SIMULATION_SECRET_KEY] = str(self.keys.simulation_secret_path)
        return record

    def _note_layout(self, arrays: ArrayRecord) -> None:
        if is_encrypted_model(arrays):
            ev, layout = model_from_record(arrays)
            if ev.fingerprint != self.keys.context.fingerprint:
                raise CiphertextError(
                    "the encrypted global model (checkpoint?) was made under another key"
                )
        else:
            layout = ArrayLayout.of(arrays)
        self._layout = layout

    def _with_he(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for msg in out:
            msg.content.config_records[HE_RECORD] = self._he_record()
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._note_layout(arrays)
        return self._with_he(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._with_he(super().configure_evaluate(server_round, arrays, config, grid))

    # ------------------------------------------------------------------ aggregation

    def check_train_reply(self, msg: Message, spec: ModelLayout | None,
                          metrics: dict[str, float], check_finite: bool = True) -> ValidReply:
        """Validate an encrypted reply and add it to the running sum (or reject it whole).

        `spec`/`check_finite` concern plaintext arrays and do not apply: what arrives is
        ciphertext, validated by `EncryptedSum.add`.
        """
        if self._sum is None:
            raise InvalidReply("no aggregation in progress")
        content = msg.content
        if list(content.array_records.keys()) != ["arrays"]:
            raise InvalidReply(f"expected one ArrayRecord 'arrays', got "
                               f"{list(content.array_records.keys())}")
        record = content.metric_records.get("metrics")
        if record is None or NUM_EXAMPLES_KEY not in record:
            raise InvalidReply(f"no '{NUM_EXAMPLES_KEY}' in the metrics")
        n = check_num_examples(record[NUM_EXAMPLES_KEY], self.max_num_examples)
        if n > int(self.settings.max_weight):
            raise InvalidReply(f"'{NUM_EXAMPLES_KEY}'={n} exceeds aggregation.max_weight="
                               f"{self.settings.max_weight}")
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise InvalidReply(f"non-finite metrics {bad}")
        try:
            self._sum.add(encrypted_from_record(content.array_records["arrays"]))
        except CiphertextError as exc:
            raise InvalidReply(f"encrypted update refused: {exc}") from None
        self.round_log.client_metrics[msg.metadata.src_node_id] = metrics
        return ValidReply(msg.metadata.src_node_id, n, [], metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._layout is None:
            raise RuntimeError("aggregate_train before configure_train")
        started = time.perf_counter()
        self._sum = EncryptedSum(self.keys.context, dim=self._layout.size,
                                 scale_bits=self.scale_bits,
                                 max_terms=int(self.settings.max_clients))
        try:
            valid = self.screen_train_replies(replies)
            self.check_everyone_exhausted()
            if not self.enough_replies(len(valid)):
                return None, None
            encrypted = self._sum.result()
        finally:
            self._sum.close()
            self._sum = None
        arrays = model_to_record(encrypted, self._layout)
        self.round_log.add_seconds("aggregate", time.perf_counter() - started)
        self.round_log.extra["he"] = {
            "preset": self.settings.preset,
            "scale_bits": self.scale_bits,
            "ciphertexts": encrypted.count,
            "summed": encrypted.num_terms,
            "model_bytes": encrypted.nbytes,
        }
        return arrays, self.finish_train_metrics(valid)
