"""`aggregation=he`: a FedAvg server that adds CKKS ciphertexts it cannot read.

The server holds a public context only. Each round it sends the global model (plaintext in
round 1: every client already derives the same initial model from the run seed, so it holds
nothing secret; the encrypted sum from round 2 on), validates every encrypted reply (wire
structure, digest, fingerprint, ciphertext count, sizes, SEAL deserialisation, level and scale)
and adds it into one running ciphertext vector. A bad reply is dropped with a log line and
the round carries on with the rest. Central evaluation is off (`server_sees_model = False`):
federated evaluation on the clients gives the accuracy, and `fedstack decrypt` gives key
holders the plaintext model.

A well-formed reply can still be bad inside (random ciphertexts, or made under another key
and labelled with ours): the server cannot see it, the clients can. So a new aggregate only
becomes the global model once a client has decrypted it and its check slots and bounds held
(`ckks.decrypt_mean`): the round's federated evaluation does that at no extra cost, and
without evaluation one "model" check exchange does. If a client reports the aggregate
undecryptable (error `HE_UNDECRYPTABLE_CODE`), the round is rolled back to the last good
global model (`round_log.aborted`), group testing (`group_test`) finds the reply that caused
it, and that node is rejected in the round's log and never sampled again. A search that
identifies nobody ends the run as failed (`failure`), since the next round would likely fail the
same way. Replies are kept (ciphertext only) until the round's aggregate is settled.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedstack.log import logger as log
from fedstack.strategies.fedavg import ValidReply, WeightedFedAvg
from fedstack.strategies.he.ckks import CiphertextError, EncryptedSum, EncryptedVector
from fedstack.strategies.he.group_test import CulpritSearch, GroupTest
from fedstack.strategies.he.messages import (
    CHECK_GROUP,
    CHECK_KEY,
    CHECK_MEMBERS_KEY,
    CHECK_MODEL,
    CHECK_OK_KEY,
    CHECK_REPLIES_KEY,
    CHECK_REPLY_RECORD,
    CHECK_ROUND_KEY,
    FINGERPRINT_KEY,
    HE_RECORD,
    HE_UNDECRYPTABLE_CODE,
    SIMULATION_SECRET_KEY,
)
from fedstack.strategies.he.provisioning import (
    SIMULATION_KEY_DIR,
    ServerKeys,
    load_server_public_context,
    server_keys,
)
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
from fedstack.strategies.runtime import is_deployment

__all__ = ["FINGERPRINT_KEY", "HE_RECORD", "SIMULATION_SECRET_KEY", "HEFedAvg"]

#: Clients asked to verify a new aggregate when the round's evaluation gave no verdict.
MODEL_VERIFIERS = 2
#: Phase names of the extra exchanges in the round log's seconds.
VERIFY_PHASE = "he_verify"
SEARCH_PHASE = "he_search"
#: Reason recorded (round_log.rejected) for the node whose reply spoiled the aggregate.
CULPRIT_REASON = ("HE: its encrypted reply made the aggregate fail its integrity check "
                  "(identified by group testing); excluded for the rest of the run")


@dataclass
class PendingAggregate:
    """A new aggregate that no client has verified yet, and the replies it sums."""

    arrays: ArrayRecord
    replies: dict[int, EncryptedVector]


class HEFedAvg(WeightedFedAvg):
    """Weighted FedAvg over CKKS ciphertexts; never decrypts (it has no key to)."""

    server_sees_model = False
    visibility = (
        "only CKKS ciphertexts: each client's weighted update and the aggregate (the global "
        "model) stay encrypted under a key the server does not hold; it sees each client's "
        "plaintext train metrics (num-examples, train-loss) and the model's layout"
    )

    def __init__(self, *, settings: HESettings, keys: ServerKeys | None = None,
                 run_dir: Path | None = None, **common: Any) -> None:
        super().__init__(**common)
        self.settings = settings
        self._keys = keys
        self.run_dir = run_dir
        self.scale_bits = settings.effective_scale_bits()
        self._layout: ArrayLayout | None = None
        self._sum: EncryptedSum | None = None
        self._replies: dict[int, EncryptedVector] = {}
        self._pending: PendingAggregate | None = None
        self._verdicts: dict[int, bool] = {}
        #: The last verified global model, the round that produced it, the round's config.
        self._good_arrays: ArrayRecord | None = None
        self._good_round = 0
        self._round_config = ConfigRecord()
        #: Facts for the privacy report (the ledger prints `visibility`, so they go there).
        self.privacy_notes = [
            type(self).visibility + ".",
            "Central evaluation is off: the server holds no secret key and cannot read the "
            "model, so accuracy comes from the clients' federated evaluation of the decrypted "
            "model; key holders recover the final model with `fedstack decrypt`.",
            "A new aggregate becomes the global model only after a client verified it; when "
            "one fails verification, the round is rolled back and clients decrypt sums of "
            ">= 2 replies of that round (never their own, never enough to isolate one reply) "
            "to find the bad one; the server learns one pass/fail bit per group.",
        ]
        if not settings.public_context:
            self.privacy_notes.append(
                "Simulation: one process generated both the secret and the public CKKS "
                f"context (into {SIMULATION_KEY_DIR}/ of the run directory); the server "
                "strategy loaded only the public one, but a deployment must create keys on a "
                "data owner's machine (`fedstack keys`) and give the server only the public "
                "file."
            )
        self.visibility = " ".join(self.privacy_notes)

    @classmethod
    def from_config(cls, cfg: Any, *, run_dir: Path, **common: Any) -> HEFedAvg:
        from fedstack.config import settings_of

        settings = settings_of(cfg.aggregation)
        # A given public context is loaded (and checked) now; generated simulation keys wait
        # for `start`, where the grid tells simulation from deployment.
        keys = load_server_public_context(settings) if settings.public_context else None
        return cls(settings=settings, keys=keys, run_dir=Path(run_dir), **common)

    @property
    def keys(self) -> ServerKeys:
        if self._keys is None:
            raise RuntimeError("HE keys are resolved when the strategy starts")
        return self._keys

    def resolve_keys(self, grid: Grid) -> ServerKeys:
        """The public context; in simulation only, generated into the run directory."""
        if self._keys is None:
            if self.run_dir is None:
                raise RuntimeError("HEFedAvg without aggregation.public_context needs run_dir")
            self._keys = server_keys(self.settings, self.run_dir,
                                     deployment=is_deployment(grid))
        keys = self._keys
        log.info(
            "HE: preset %s, scale 2^%s, key %s… (%s)", self.settings.preset, self.scale_bits,
            keys.context.fingerprint[:12],
            "generated for this simulated run" if keys.one_process_held_both
            else f"public context {keys.public_path}",
        )
        return keys

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any
              ) -> Result:
        self.resolve_keys(grid)
        return super().start(grid, initial_arrays, *args, **kwargs)

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
        if self._good_arrays is None:
            self._good_round = server_round - 1
        self._good_arrays = arrays
        self._pending = None
        self._round_config = self._with_round(config, server_round)
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
            encrypted = encrypted_from_record(content.array_records["arrays"])
            self._sum.add(encrypted)
        except CiphertextError as exc:
            raise InvalidReply(f"encrypted update refused: {exc}") from None
        node = msg.metadata.src_node_id
        self._replies[node] = encrypted
        self.round_log.client_metrics[node] = metrics
        return ValidReply(node, n, [], metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._layout is None:
            raise RuntimeError("aggregate_train before configure_train")
        started = time.perf_counter()
        self._sum = EncryptedSum(self.keys.context, dim=self._layout.size,
                                 scale_bits=self.scale_bits,
                                 max_terms=int(self.settings.max_clients))
        self._replies = {}
        try:
            valid = self.screen_train_replies(replies)
            self.check_everyone_exhausted()
            if not self.enough_replies(len(valid)):
                self._replies = {}
                return None, None
            encrypted = self._sum.result()
        finally:
            self._sum.close()
            self._sum = None
        arrays = model_to_record(encrypted, self._layout)
        kept = {r.node_id for r in valid}
        self._pending = PendingAggregate(
            arrays, {node: ev for node, ev in self._replies.items() if node in kept})
        self._replies = {}
        self._verdicts = {}
        self.round_log.add_seconds("aggregate", time.perf_counter() - started)
        self.round_log.extra["he"] = {
            "preset": self.settings.preset,
            "scale_bits": self.scale_bits,
            "ciphertexts": encrypted.count,
            "summed": encrypted.num_terms,
            "model_bytes": encrypted.nbytes,
        }
        return arrays, self.finish_train_metrics(valid)

    # ------------------------------------------------------------------ verification

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Federated evaluation, plus each evaluator's verdict on the new aggregate."""
        rest: list[Message] = []
        for msg in replies:
            node = self.reply_node(msg)
            if msg.has_error() and msg.error.code == HE_UNDECRYPTABLE_CODE:
                self._verdicts[node] = False
                log.warning("round %s: node %s reports the new global model undecryptable",
                            server_round, node)
                continue
            if not msg.has_error():
                self._verdicts[node] = True
            rest.append(msg)
        return super().aggregate_evaluate(server_round, rest)

    def settle_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Keep the new aggregate once verified; otherwise roll back and find the bad reply."""
        pending, self._pending = self._pending, None
        if pending is None or pending.arrays is not arrays:
            return arrays  # no new aggregate this round
        verdicts, self._verdicts = dict(self._verdicts), {}
        if not verdicts:
            verdicts = self._verify_model(grid, server_round, pending)
        reported = sorted(node for node, ok in verdicts.items() if not ok)
        if verdicts and not reported:
            self._good_arrays, self._good_round = arrays, server_round
            return arrays
        return self._roll_back(grid, server_round, pending, reported)

    def _verify_model(self, grid: Grid, server_round: int, pending: PendingAggregate
                      ) -> dict[int, bool]:
        """One exchange: a few clients decrypt the new global model and answer pass/fail."""
        nodes = [n for n in self._candidates(grid, server_round, "he-verify")
                 if n in pending.replies] or self._candidates(grid, server_round, "he-verify")
        chosen = nodes[:MODEL_VERIFIERS]
        record = self._he_record()
        record[CHECK_KEY] = CHECK_MODEL
        messages = [self._check_message(pending.arrays, record, node) for node in chosen]
        return {node: ok for node, ok in self._ask(grid, messages, VERIFY_PHASE).items()
                if ok is not None}

    def _roll_back(self, grid: Grid, server_round: int, pending: PendingAggregate,
                   reported: list[int]) -> ArrayRecord:
        """Discard the round's aggregate, search for its cause, exclude and record it."""
        log_ = self.round_log
        previous = self._good_arrays
        if previous is None:
            raise RuntimeError("no verified global model to roll back to")
        he_extra = log_.extra.setdefault("he", {})
        rollback: dict[str, Any] = {
            "rolled_back_to_round": self._good_round,
            "reported_by": reported,
            "summed": sorted(pending.replies),
        }
        he_extra["rollback"] = rollback
        log_.aggregated = []
        log_.evaluate_metrics = {}
        if not reported:
            log_.aborted = (f"HE: no client could verify the new aggregate; rolled back to "
                            f"the global model of round {self._good_round}")
            log.warning("round %s: %s", server_round, log_.aborted)
            return previous
        search = self._search(grid, server_round, pending)
        rollback.update(search.to_json())
        for node in sorted(search.culprits):
            self._reject(node, CULPRIT_REASON)
            self.exhausted_nodes.add(node)
        if search.culprits:
            # Recovered by design: the cause is excluded, so the round does not count
            # against max_failed_rounds (summary.json lists it under rounds_rolled_back).
            log_.rolled_back.append(server_round)
        outcome = search.outcome()
        found = (f"culprit(s) {sorted(search.culprits)}" if search.culprits
                 else "no culprit identified")
        log_.aborted = (f"HE: the new aggregate failed its integrity check (reported by "
                        f"{len(reported)} client(s)); rolled back to the global model of "
                        f"round {self._good_round}; group testing ({search.exchanges} "
                        f"exchange(s)): {found}")
        log.warning("round %s: %s", server_round, log_.aborted)
        if outcome == "unresolved":
            self.failure = (
                f"HE: the aggregate of round {server_round} failed its integrity check and "
                "group testing could not identify the reply that caused it (history: "
                "extra.he.rollback); the global model was kept")
        return previous

    def _search(self, grid: Grid, server_round: int, pending: PendingAggregate
                ) -> CulpritSearch:
        testers = tuple(self._candidates(grid, server_round, "he-search"))
        search = CulpritSearch(replies=tuple(sorted(pending.replies)), testers=testers)
        while tests := search.plan():
            answers = self._run_tests(grid, server_round, pending, search, tests)
            for test in tests:
                search.record(test, answers.get(test.tester))
        return search

    def _run_tests(self, grid: Grid, server_round: int, pending: PendingAggregate,
                   search: CulpritSearch, tests: list[GroupTest]) -> dict[int, bool | None]:
        """One exchange: each tester gets the encrypted sum of its group."""
        if self._layout is None:
            raise RuntimeError("group testing without a model layout")
        messages = []
        for test in tests:
            acc = EncryptedSum(self.keys.context, dim=self._layout.size,
                               scale_bits=self.scale_bits, max_terms=len(test.members))
            try:
                for node in test.members:
                    acc.add(pending.replies[node])
                group_sum = acc.result()
            finally:
                acc.close()
            record = self._he_record()
            record[CHECK_KEY] = CHECK_GROUP
            record[CHECK_ROUND_KEY] = server_round
            record[CHECK_MEMBERS_KEY] = json.dumps(list(test.members))
            record[CHECK_REPLIES_KEY] = json.dumps(list(search.replies))
            messages.append(self._check_message(model_to_record(group_sum, self._layout),
                                                record, test.tester))
        return self._ask(grid, messages, SEARCH_PHASE)

    def _check_message(self, arrays: ArrayRecord, record: ConfigRecord, node: int) -> Message:
        return Message(RecordDict({"arrays": arrays, "config": self._round_config,
                                   HE_RECORD: record}),
                       dst_node_id=node, message_type=MessageType.EVALUATE)

    def _ask(self, grid: Grid, messages: list[Message], phase: str) -> dict[int, bool | None]:
        """Send check requests; each destination's bit (None: error, refusal or no answer)."""
        answers: dict[int, bool | None] = {m.metadata.dst_node_id: None for m in messages}
        for reply in self.exchange(grid, messages, phase):
            node = self.reply_node(reply)
            if node not in answers:
                continue
            if reply.has_error():
                log.warning("round %s: node %s did not answer an HE check: %s",
                            self.round_log.server_round, node, reply.error.reason)
                continue
            record = reply.content.config_records.get(CHECK_REPLY_RECORD)
            ok = record.get(CHECK_OK_KEY) if record is not None else None
            if isinstance(ok, bool):
                answers[node] = ok
        return answers

    def _candidates(self, grid: Grid, server_round: int, phase: str) -> list[int]:
        """Connected nodes that may verify or test, in a seeded order."""
        nodes = sorted(set(grid.get_node_ids()) - self.exhausted_nodes)
        random.Random(f"{self.seed}:{server_round}:{phase}").shuffle(nodes)
        return nodes
