"""Weighted FedAvg as a Message-API strategy: w <- sum_k (n_k / n) w_k.

Why our own rather than `flwr.serverapp.strategy.FedAvg`:
- every reply is validated against the global model (names, shapes, dtypes, finiteness,
  a plausible weight) and a bad one is dropped with a log line instead of raising or
  corrupting the aggregate;
- the weighted sum is accumulated in float64 over zero-copy views of the received buffers,
  array-major in fixed-size chunks, and the result is serialised chunk by chunk, so the
  extra memory is the size of the output model (no per-reply copies, no K-fold buffers);
- one round loop (`start`) shared by every aggregation: per-round bookkeeping (`RoundLog`),
  a recorder hook that writes history/checkpoints as each round ends, resumption from a
  checkpoint, and an early stop when no client is willing to train any more.
Protocol layers (secure aggregation, HE) subclass it and reuse sampling, validation,
evaluation and outputs.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedstack.log import logger as log
from fedstack.strategies.model_layout import ModelLayout
from fedstack.strategies.reply_validation import (
    NUM_EXAMPLES_KEY,
    NUMPY_STYPE,
    InvalidReply,
    check_arrays,
    check_num_examples,
    decline_reason,
    metrics_of,
)
from fedstack.strategies.round_log import RoundLog, payload_bytes

#: Elements per step of the chunked weighted sum (bounds the float64 running buffer).
AGGREGATION_CHUNK = 1 << 14
#: Seconds between checks while waiting for enough nodes to connect.
NODE_POLL_SECONDS = 1.0
#: Metric keys averaged (weighted by num-examples) over train / evaluate replies.
TRAIN_METRIC_KEYS = ("train-loss",)
EVAL_METRIC_KEYS = ("eval-loss", "eval-accuracy")


class RoundRecorder(Protocol):
    """Receives each round's outcome as it ends (run outputs, ledgers)."""

    def on_round_end(self, round_log: RoundLog, arrays: ArrayRecord) -> None: ...


class TrainHook(Protocol):
    """Per-node records in train messages and a veto on train replies (the privacy ledger)."""

    def train_records(self, grid: Grid, node_ids: list[int]) -> dict[int, dict[str, dict]]: ...

    def check_train_reply(self, node_id: int, metrics: dict[str, float],
                          content: RecordDict) -> str | None: ...


class ViewRecorder(Protocol):
    """Sees every message exchange and each round's aggregate (audit mode only:
    `fedstack.outputs.server_view` keeps the server's view of one round for the attacks)."""

    def on_send(self, server_round: int, phase: str, sent: list[Message]) -> None: ...

    def on_receive(self, server_round: int, phase: str, sent: list[Message],
                   replies: list[Message]) -> None: ...

    def on_aggregate(self, server_round: int, arrays: ArrayRecord | None,
                     metrics: MetricRecord | None,
                     computed: dict[str, np.ndarray] | None) -> None: ...


@dataclass
class ValidReply:
    node_id: int
    num_examples: int
    views: list[np.ndarray]
    metrics: dict[str, float]


class NonFiniteReplies(Exception):
    """The weighted sum met NaN/inf: the replies (indices) whose arrays carry them."""

    def __init__(self, indices: list[int], array_name: str) -> None:
        super().__init__(f"non-finite values in {array_name!r} from replies {indices}")
        self.indices = indices
        self.array_name = array_name


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return header.getvalue()


def weighted_mean(spec: ModelLayout, replies: list[ValidReply]) -> ArrayRecord:
    """sum_k n_k w_k / sum_k n_k, accumulated in float64, written straight into .npy bytes.

    Array-major and chunked: for each slice of each array, every reply's (zero-copy) slice is
    added into one small float64 buffer, which is scaled and written into the output buffer.
    Non-finite inputs always make the chunk's sum non-finite, so checking the sum (one small
    check per chunk) finds them without a separate pass over K replies; the culprits are then
    named in `NonFiniteReplies`. Arrays are produced largest first, so the transient copy that
    turns the buffer into `bytes` coincides with the least finished output.
    """
    total = float(sum(r.num_examples for r in replies))
    acc = np.empty(AGGREGATION_CHUNK, dtype=np.float64)
    scratch = np.empty(AGGREGATION_CHUNK, dtype=np.float64)
    produced: dict[str, Array] = {}
    order = sorted(range(len(spec.names)),
                   key=lambda i: -int(np.prod(spec.shapes[i], dtype=np.int64)))
    for i in order:
        name, shape = spec.names[i], tuple(spec.shapes[i])
        dtype = np.dtype(spec.dtypes[i])
        flats = [np.ravel(r.views[i], order="C") for r in replies]
        size = int(np.prod(shape, dtype=np.int64))
        head = _npy_header(dtype, shape)
        payload = bytearray(len(head) + size * dtype.itemsize)
        payload[:len(head)] = head
        target = np.frombuffer(payload, dtype=dtype, count=size, offset=len(head))
        for start in range(0, size, AGGREGATION_CHUNK):
            stop = min(size, start + AGGREGATION_CHUNK)
            part, tmp = acc[:stop - start], scratch[:stop - start]
            part.fill(0.0)
            for flat, reply in zip(flats, replies, strict=True):
                np.multiply(flat[start:stop], reply.num_examples, out=tmp, dtype=np.float64)
                part += tmp
            if not np.isfinite(part).all():
                bad = [k for k, flat in enumerate(flats)
                       if not np.isfinite(flat[start:stop]).all()]
                raise NonFiniteReplies(bad, name)
            part /= total
            if dtype.kind in "iu":
                np.rint(part, out=part)
            target[start:stop] = part
        del target
        produced[name] = Array(dtype=str(dtype), shape=shape, stype=NUMPY_STYPE,
                               data=bytes(payload))
        del payload
    return ArrayRecord({name: produced[name] for name in spec.names})


def weighted_metrics(items: Iterable[tuple[int, dict[str, float]]],
                     keys: Iterable[str]) -> dict[str, float]:
    """Weighted means of `keys` over (weight, metrics) pairs that report them."""
    items = list(items)
    result: dict[str, float] = {}
    for key in keys:
        pairs = [(w, m[key]) for w, m in items if key in m and math.isfinite(m[key])]
        weight = sum(w for w, _ in pairs)
        if weight > 0:
            result[key] = sum(w * v for w, v in pairs) / weight
    return result


class WeightedFedAvg(Strategy):
    """Weighted federated averaging with validated, memory-lean aggregation."""

    #: Whether the server can read the global model (False for HE: no central evaluation).
    server_sees_model: bool = True
    #: What the server sees under this aggregation (for the privacy report and README).
    visibility: str = ("every sampled client's model update (weights) and its number of "
                       "examples, in the clear, plus the global model")

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_valid_replies: int = 1,
        max_num_examples: int = 1_000_000,
        timeout: float = 300.0,
        seed: int = 0,
    ) -> None:
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_valid_replies = min_valid_replies
        self.max_num_examples = max_num_examples
        self.timeout = timeout
        self.seed = seed
        self.round_log = RoundLog(server_round=0)
        #: Nodes that declined permanently (e.g. privacy budget spent): never sampled again.
        self.exhausted_nodes: set[int] = set()
        #: Set when the run must end early by design; `start` stops after the current round.
        self.stop_reason: str | None = None
        #: Set when the run must end because it failed (too many failed rounds).
        self.failure: str | None = None
        self._spec: ModelLayout | None = None
        self._grid: Grid | None = None
        #: Hooks on every train exchange (the privacy ledger registers itself).
        self.train_hooks: list[TrainHook] = []
        #: message id -> destination node of what we sent (to attribute error replies).
        self._reply_dst: dict[str, int] = {}
        #: Audit mode: recorders of the server's view (empty unless `audit.record_round`).
        self.view_recorders: list[ViewRecorder] = []
        #: What aggregate_train computed beyond the new model, for the view recorders
        #: (secagg: the unmasked sum); reset every round.
        self.computed_view: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ plumbing

    def summary(self) -> None:
        log.info("%s: fraction_train=%s min_train_nodes=%s fraction_evaluate=%s "
                 "min_valid_replies=%s max_num_examples=%s timeout=%ss",
                 type(self).__name__, self.fraction_train, self.min_train_nodes,
                 self.fraction_evaluate, self.min_valid_replies, self.max_num_examples,
                 self.timeout)

    def exchange(self, grid: Grid, messages: Iterable[Message], phase: str,
                 timeout: float | None = None) -> list[Message]:
        """One send_and_receive, counted in the round log (exchanges, bytes, seconds)."""
        messages = list(messages)
        if not messages:
            return []
        started = time.perf_counter()
        self.round_log.bytes_down += sum(payload_bytes(m.content) for m in messages)
        for recorder in self.view_recorders:  # before sending: a runtime may consume them
            recorder.on_send(self.round_log.server_round, phase, messages)
        replies = list(grid.send_and_receive(messages, timeout=timeout or self.timeout))
        self._reply_dst.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages
                                if m.metadata.message_id})
        self.round_log.exchanges += 1
        self.round_log.bytes_up += sum(payload_bytes(r.content) for r in replies
                                       if not r.has_error())
        self.round_log.add_seconds(phase, time.perf_counter() - started)
        for recorder in self.view_recorders:
            recorder.on_receive(self.round_log.server_round, phase, messages, replies)
        return replies

    def reply_node(self, msg: Message) -> int:
        """The node a reply is about.

        In deployment the SuperLink itself answers for an unreachable node (an error reply
        whose source is the SuperLink): attribute it to the node the request went to.
        """
        if msg.has_error():
            return self._reply_dst.get(msg.metadata.reply_to_message_id,
                                       msg.metadata.src_node_id)
        return msg.metadata.src_node_id

    def sample_nodes(self, grid: Grid, fraction: float, min_nodes: int, phase: str,
                     server_round: int | None = None) -> list[int]:
        """Sample max(min_nodes, ceil(fraction * available)) nodes, seeded by the run seed.

        Waits up to the timeout for `min_nodes` to be connected; returns [] (and marks
        the round) if they never are. Nodes that declined permanently are never sampled.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            connected = set(grid.get_node_ids())
            available = sorted(connected - self.exhausted_nodes)
            if len(available) >= min_nodes or time.monotonic() >= deadline:
                break
            if connected and not available:
                break  # everyone connected has declined for good: waiting changes nothing
            time.sleep(NODE_POLL_SECONDS)
        if len(available) < max(min_nodes, 1):
            return []
        count = min(len(available), max(min_nodes, math.ceil(fraction * len(available))))
        rnd = self.round_log.server_round if server_round is None else server_round
        rng = random.Random(f"{self.seed}:{rnd}:{phase}")
        return sorted(rng.sample(available, count))

    @staticmethod
    def _with_round(config: ConfigRecord, server_round: int) -> ConfigRecord:
        out = ConfigRecord(dict(config))
        out["server-round"] = server_round
        return out

    # ------------------------------------------------------------------ training

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        nodes = self.sample_nodes(grid, self.fraction_train, self.min_train_nodes, "train")
        self.round_log.sampled = nodes
        if not nodes:
            self._note_no_nodes(grid, self.min_train_nodes)
            return []
        self._spec = ModelLayout.of(arrays)
        content_config = self._with_round(config, server_round)
        return [Message(RecordDict({"arrays": arrays, "config": content_config}),
                        dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]

    def with_hook_records(self, grid: Grid, messages: Iterable[Message]) -> list[Message]:
        """Train messages with each train hook's records for their node added."""
        out = list(messages)
        for hook in self.train_hooks:
            records = hook.train_records(grid, [m.metadata.dst_node_id for m in out])
            for msg in out:
                for name, record in records.get(msg.metadata.dst_node_id, {}).items():
                    msg.content.config_records[name] = ConfigRecord(record)
        return out

    def check_everyone_exhausted(self) -> None:
        """End the run once every connected node has declined permanently."""
        if self._grid is None or not self.exhausted_nodes:
            return
        connected = set(self._grid.get_node_ids())
        if connected and connected <= self.exhausted_nodes:
            self.stop_reason = (f"all {len(connected)} connected clients declined permanently "
                                "(e.g. their privacy budgets are exhausted)")

    def _note_no_nodes(self, grid: Grid, needed: int) -> None:
        available = set(grid.get_node_ids())
        willing = available - self.exhausted_nodes
        if available and not willing:
            self.stop_reason = (f"all {len(available)} connected clients declined permanently "
                                "(e.g. their privacy budgets are exhausted)")
        self.round_log.aborted = (f"only {len(willing)} willing nodes connected, "
                                  f"need {needed}")
        log.warning("round %s: %s", self.round_log.server_round, self.round_log.aborted)

    def screen_train_replies(self, replies: Iterable[Message], spec: ModelLayout | None = None,
                             check_finite: bool = True) -> list[ValidReply]:
        """Classify replies: errors and invalid ones are rejected, declines noted."""
        spec = spec or self._spec
        valid: list[ValidReply] = []
        seen: set[int] = set()
        for msg in replies:
            node = self.reply_node(msg)
            try:
                if node in seen:
                    raise InvalidReply("duplicate reply from the same node")
                seen.add(node)
                if msg.has_error():
                    raise InvalidReply(f"client error {msg.error.code}: {msg.error.reason}")
                declined = decline_reason(msg)
                metrics = metrics_of(msg)
                self._note_partition(node, metrics)
                for hook in self.train_hooks:
                    refused = hook.check_train_reply(node, metrics, msg.content)
                    if refused is not None:
                        raise InvalidReply(refused)
                if declined is not None:
                    reason, permanent = declined
                    self.round_log.declined[node] = reason
                    self.round_log.client_metrics[node] = metrics
                    if permanent:
                        self.exhausted_nodes.add(node)
                    log.info("round %s: node %s declined: %s", self.round_log.server_round,
                             node, reason)
                    continue
                valid.append(self.check_train_reply(msg, spec, metrics, check_finite))
            except InvalidReply as exc:
                self._reject(node, str(exc))
        return valid

    def _reject(self, node: int, reason: str) -> None:
        self.round_log.rejected[node] = reason
        self.round_log.client_metrics.pop(node, None)
        log.warning("round %s: rejected the reply of node %s: %s", self.round_log.server_round,
                    node, reason)

    def _note_partition(self, node: int, metrics: dict[str, float]) -> None:
        if "partition-id" in metrics:
            self.round_log.client_partitions[node] = int(metrics["partition-id"])

    def check_train_reply(self, msg: Message, spec: ModelLayout | None,
                          metrics: dict[str, float], check_finite: bool = True) -> ValidReply:
        content = msg.content
        if spec is None:
            raise InvalidReply("no global model was sent this round")
        if list(content.array_records.keys()) != ["arrays"]:
            raise InvalidReply(f"expected one ArrayRecord 'arrays', got "
                               f"{list(content.array_records.keys())}")
        if "metrics" not in content.metric_records:
            raise InvalidReply("no MetricRecord 'metrics'")
        record = content.metric_records["metrics"]
        if NUM_EXAMPLES_KEY not in record:
            raise InvalidReply(f"no '{NUM_EXAMPLES_KEY}' in the metrics")
        n = check_num_examples(record[NUM_EXAMPLES_KEY], self.max_num_examples)
        views = check_arrays(content.array_records["arrays"], spec, check_finite)
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise InvalidReply(f"non-finite metrics {bad}")
        self.round_log.client_metrics[msg.metadata.src_node_id] = metrics
        return ValidReply(msg.metadata.src_node_id, n, views, metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.screen_train_replies(replies, check_finite=False)
        self.check_everyone_exhausted()
        started = time.perf_counter()
        while True:
            if not self.enough_replies(len(valid)):
                return None, None
            try:
                arrays = weighted_mean(self._spec, valid)  # type: ignore[arg-type]
                break
            except NonFiniteReplies as exc:
                # Rare path: drop the poisoned replies and sum again without them.
                for index in sorted(exc.indices, reverse=True):
                    bad = valid.pop(index)
                    self._reject(bad.node_id, f"array {exc.array_name!r} contains NaN or "
                                              "infinite values")
        self.round_log.add_seconds("aggregate", time.perf_counter() - started)
        return arrays, self.finish_train_metrics(valid)

    def enough_replies(self, count: int) -> bool:
        """False (and the round marked aborted) if fewer than min_valid_replies are usable."""
        if count >= self.min_valid_replies:
            return True
        if self.round_log.aborted is None:
            self.round_log.aborted = (f"{count} valid replies, need min_valid_replies="
                                      f"{self.min_valid_replies}: keeping the previous model")
        log.warning("round %s: %s", self.round_log.server_round, self.round_log.aborted)
        return False

    def finish_train_metrics(self, valid: list[ValidReply]) -> MetricRecord:
        self.round_log.aggregated = sorted(r.node_id for r in valid)
        metrics = weighted_metrics(((r.num_examples, r.metrics) for r in valid),
                                   TRAIN_METRIC_KEYS)
        metrics[NUM_EXAMPLES_KEY] = float(sum(r.num_examples for r in valid))
        self.round_log.train_metrics = metrics
        return MetricRecord(metrics)

    # ------------------------------------------------------------------ evaluation

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.sample_nodes(grid, self.fraction_evaluate, self.min_evaluate_nodes,
                                  "evaluate")
        content_config = self._with_round(config, server_round)
        return [Message(RecordDict({"arrays": arrays, "config": content_config}),
                        dst_node_id=node, message_type=MessageType.EVALUATE) for node in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        items: list[tuple[int, dict[str, float]]] = []
        for msg in replies:
            node = self.reply_node(msg)
            if msg.has_error():
                log.warning("round %s: evaluate error from node %s: %s", server_round, node,
                            msg.error.reason)
                continue
            metrics = metrics_of(msg)
            try:
                n = check_num_examples(metrics.get(NUM_EXAMPLES_KEY), self.max_num_examples)
            except InvalidReply as exc:
                log.warning("round %s: ignored the evaluation of node %s: %s", server_round,
                            node, exc)
                continue
            items.append((n, metrics))
        if not items:
            return None
        result = weighted_metrics(items, EVAL_METRIC_KEYS)
        result[NUM_EXAMPLES_KEY] = float(sum(n for n, _ in items))
        self.round_log.evaluate_metrics = result
        return MetricRecord(result)

    def settle_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The model the round ends with, once its evaluation is in.

        A protocol whose aggregate only clients can check (HE) rolls back here; it then sets
        `round_log.aborted` and returns the previous model.
        """
        return arrays

    # ------------------------------------------------------------------ round loop

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        recorder: RoundRecorder | None = None,
        max_failed_rounds: int | None = None,
        failed_before: int = 0,
    ) -> Result:
        """Run rounds `first_round..num_rounds`; the recorder sees each round as it ends.

        A round that produced no new global model has failed; once more than
        `max_failed_rounds` have (`failed_before` of them in earlier processes of a resumed
        run), the run ends with `self.failure` set instead of training on.
        """
        if timeout is not None:
            self.timeout = timeout
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        central = evaluate_fn if self.server_sees_model else None
        result = Result()
        arrays = initial_arrays
        result.arrays = arrays
        if central is not None and first_round == 1:
            res = central(0, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
                if recorder is not None:
                    zero = RoundLog(server_round=0, central_metrics=dict(res))
                    recorder.on_round_end(zero, arrays)
        for server_round in range(first_round, num_rounds + 1):
            self.round_log = RoundLog(server_round=server_round)
            messages = self.with_hook_records(
                grid, self.configure_train(server_round, arrays, train_config, grid))
            replies = self.exchange(grid, messages, "train")
            self.computed_view = None
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            for view_recorder in self.view_recorders:
                view_recorder.on_aggregate(server_round, new_arrays, train_metrics,
                                           self.computed_view)
            if new_arrays is not None:
                arrays = new_arrays
                result.arrays = arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            eval_messages = self.configure_evaluate(server_round, arrays, evaluate_config, grid)
            eval_replies = self.exchange(grid, eval_messages, "evaluate")
            eval_metrics = self.aggregate_evaluate(server_round, eval_replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_metrics
            arrays = self.settle_round(grid, server_round, arrays)
            result.arrays = arrays
            if central is not None:
                started = time.perf_counter()
                res = central(server_round, arrays)
                self.round_log.add_seconds("central_evaluate", time.perf_counter() - started)
                if res is not None:
                    self.round_log.central_metrics = dict(res)
                    result.evaluate_metrics_serverapp[server_round] = res
            if recorder is not None:
                recorder.on_round_end(self.round_log, arrays)
            if self.stop_reason is not None:
                log.warning("stopping after round %s: %s", server_round, self.stop_reason)
                break
            if self.failure is not None:  # a protocol that cannot go on (e.g. HE's search)
                log.error("stopping after round %s: %s", server_round, self.failure)
                break
            if (self.round_log.aborted is not None
                    and server_round not in self.round_log.rolled_back):
                failed_before += 1
                if max_failed_rounds is not None and failed_before > max_failed_rounds:
                    self.failure = (f"{failed_before} round(s) failed, more than "
                                    f"max_failed_rounds={max_failed_rounds}; last: round "
                                    f"{server_round}: {self.round_log.aborted}")
                    log.error("stopping after round %s: %s", server_round, self.failure)
                    break
        return result
