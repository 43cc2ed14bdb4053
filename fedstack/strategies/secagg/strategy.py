"""``aggregation=secagg`` on the server: WeightedFedAvg whose train phase is masked.

Exchanges per round (each one ``grid.send_and_receive``, counted in the round log):

* steady state: 2 -- the train message carries the routed share ciphertexts and its reply
  the masked input plus fresh public keys for the next round; the unmask exchange also
  carries the next round's share request, whose replies are the next round's shares. A
  node sampled for the next round that sent no keys (its reply was lost) sits that round
  out and is asked for keys for the round after, in the same unmask exchange.
* 4 when a round must set itself up (advertise + share, then train and unmask): the first
  round, ``pipeline: false``, fewer than ``min_train_nodes`` nodes with keys, or a previous
  round that aborted before its unmask exchange.
Evaluation adds the base's one exchange, as for plain FedAvg. Flower's SecAgg+ needs 4
protocol exchanges every round.

Below the threshold the round aborts: the global model stays as it was, the round log says
why, and the run goes on.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedstack.config import settings_of
from fedstack.log import logger as log
from fedstack.strategies.fedavg import ValidReply, WeightedFedAvg
from fedstack.strategies.model_layout import ModelLayout
from fedstack.strategies.reply_validation import NUM_EXAMPLES_KEY, InvalidReply

from . import wire
from .errors import ProtocolViolation, SecAggAbort
from .messages import Advert, MaskedInput, MaskRequest
from .mod import MASKED_ARRAY, MASKED_RECORD, SECAGG_RECORD
from .params import ProtocolParams
from .server import ServerRound
from .settings import SecAggSettings

PHASE_ADVERTISE = "secagg-advertise"
PHASE_SHARE = "secagg-share"
PHASE_UNMASK = "secagg-unmask"


class SecAggFedAvg(WeightedFedAvg):
    """Weighted FedAvg over the Bonawitz et al. double-masking protocol (optionally SecAgg+)."""

    server_sees_model = True
    visibility = (
        "only the sum over the surviving clients of their quantised n_k * w_k and "
        "the sum of their n_k (never one client's update, example count or loss), "
        "which clients took part or dropped, and the global model"
    )

    def __init__(
        self,
        *,
        settings: SecAggSettings | None = None,
        params: ProtocolParams | None = None,
        num_rounds: int | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.settings = settings or SecAggSettings()
        self.params = params or self.settings.protocol({"max_num_examples": self.max_num_examples})
        self.num_rounds = num_rounds
        #: round -> node -> public keys advertised for that round
        self._adverts: dict[int, dict[int, Advert]] = {}
        #: round -> (server round, mask requests) prepared by the previous round, or its abort
        self._prepared: dict[int, tuple[ServerRound, dict[int, MaskRequest]] | SecAggAbort] = {}
        self._round: ServerRound | None = None
        self._config = ConfigRecord()
        self._masked: dict[int, MaskedInput] = {}

    @classmethod
    def from_config(cls, cfg: Any, *, run_dir: Path, **common: Any) -> SecAggFedAvg:
        settings: SecAggSettings = settings_of(cfg.aggregation)
        return cls(
            settings=settings,
            params=settings.protocol(cfg),
            num_rounds=int(cfg.num_rounds),
            **common,
        )

    # ------------------------------------------------------------------ helpers

    def _abort(self, exc: SecAggAbort) -> None:
        self.round_log.aborted = f"{exc} -- keeping the previous global model"
        log.warning("round %s: %s", self.round_log.server_round, self.round_log.aborted)

    def _stage(self, grid: Grid, parts: dict[int, wire.Wire], phase: str) -> dict[int, dict]:
        """One protocol exchange; returns each valid reply's secagg record, notes the rest."""
        messages = [
            Message(
                RecordDict({"config": self._config, SECAGG_RECORD: ConfigRecord(p)}),
                dst_node_id=u,
                message_type=MessageType.TRAIN,
            )
            for u, p in parts.items()
        ]
        replies = self.exchange(grid, messages, phase, timeout=float(self.settings.stage_timeout))
        out: dict[int, dict] = {}
        for rep in replies:
            node = self.reply_node(rep)
            if rep.has_error():
                self._note_dropout(
                    node, f"{phase}: client error {rep.error.code}: {rep.error.reason}"
                )
            elif (
                node not in parts or node in out or SECAGG_RECORD not in rep.content.config_records
            ):
                self._note_dropout(node, f"{phase}: unexpected or malformed reply")
            else:
                out[node] = dict(rep.content.config_records[SECAGG_RECORD])
        return out

    def _note_dropout(self, node: int, reason: str) -> None:
        """Like the base's ``_reject`` but keeps the node's train metrics: a node that drops
        while unmasking did train (and, under DP, spent privacy budget)."""
        self.round_log.rejected[node] = reason
        log.warning("round %s: node %s dropped: %s", self.round_log.server_round, node, reason)

    def _decode(self, replies: dict[int, dict], decoder, phase: str) -> dict:
        out = {}
        for node, w in replies.items():
            try:
                out[node] = decoder(w, node)
            except ProtocolViolation as exc:
                self._note_dropout(node, f"{phase}: {exc}")
        return out

    def _sample_round(self, grid: Grid, server_round: int) -> list[int]:
        # Sampling round r+1 ahead of time (pipelining) must draw exactly what round r+1
        # would draw itself.
        return self.sample_nodes(grid, self.fraction_train, self.min_train_nodes, "train",
                                 server_round=server_round)

    def _setup_round(
        self, grid: Grid, server_round: int, nodes: list[int]
    ) -> tuple[ServerRound, dict[int, MaskRequest]]:
        """Advertise (for nodes without keys) and share exchanges, run before training."""
        known = self._adverts.pop(server_round, {})
        adverts = {u: known[u] for u in nodes if u in known}
        missing = [u for u in nodes if u not in adverts]
        if missing:
            self._collect_adverts(
                self._stage(
                    grid, {u: {wire.ADVERTISE_REQ: server_round} for u in missing}, PHASE_ADVERTISE
                ),
                server_round,
            )
            adverts.update(
                {u: a for u, a in self._adverts.pop(server_round, {}).items() if u in nodes}
            )
        srv = self._new_round(server_round, adverts)
        replies = self._stage(
            grid,
            {u: wire.encode_share_request(q) for u, q in srv.share_requests().items()},
            PHASE_SHARE,
        )
        return srv, self._close_shares(
            srv, self._decode(replies, wire.decode_share_reply, PHASE_SHARE)
        )

    def _collect_adverts(self, replies: dict[int, dict], for_round: int) -> None:
        with_keys = {u: w for u, w in replies.items() if wire.ADVERT in w}
        for node, adv in self._decode(with_keys, wire.decode_advert, PHASE_ADVERTISE).items():
            if adv.round_num == for_round:
                self._adverts.setdefault(for_round, {})[node] = adv

    def _new_round(self, server_round: int, adverts: dict[int, Advert]) -> ServerRound:
        assert self._spec is not None
        srv = ServerRound(server_round, self.params, self._spec.size + 1, adverts)
        for node, reason in srv.rejected.items():
            self._note_dropout(node, reason)
        return srv

    def _close_shares(self, srv: ServerRound, shares: dict) -> dict[int, MaskRequest]:
        reqs = srv.receive_shares(shares)
        for node, reason in srv.rejected.items():
            self._note_dropout(node, reason)
        return reqs

    # ------------------------------------------------------------------ training

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._grid = grid
        self._round = None
        self._spec = ModelLayout.of(arrays)
        self._config = self._with_round(config, server_round)
        prepared = self._prepared.pop(server_round, None)
        try:
            if isinstance(prepared, SecAggAbort):
                raise prepared
            if prepared is None:
                nodes = self.sample_nodes(grid, self.fraction_train, self.min_train_nodes, "train")
                self.round_log.sampled = nodes
                if not nodes:
                    self._note_no_nodes(grid, self.min_train_nodes)
                    return []
                prepared = self._setup_round(grid, server_round, nodes)
            else:
                self.round_log.sampled = prepared[0].participants
        except SecAggAbort as exc:
            self._abort(exc)
            return []
        self._round, mask_requests = prepared
        ask_keys = self.settings.pipeline and (
            self.num_rounds is None or server_round < self.num_rounds
        )
        messages = []
        for node, req in mask_requests.items():
            part = wire.encode_mask_request(req)
            if ask_keys:
                part[wire.ADVERTISE_REQ] = server_round + 1
            messages.append(
                Message(
                    RecordDict(
                        {
                            "arrays": arrays,
                            "config": self._config,
                            SECAGG_RECORD: ConfigRecord(part),
                        }
                    ),
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                )
            )
        return messages

    def check_train_reply(
        self,
        msg: Message,
        spec: ModelLayout | None,
        metrics: dict[str, float],
        check_finite: bool = True,
    ) -> ValidReply:
        """A masked-input reply: masked words (+ next round's keys); never plaintext arrays."""
        content, node = msg.content, msg.metadata.src_node_id
        if SECAGG_RECORD not in content.config_records:
            raise InvalidReply("reply lacks the secagg record")
        if content.array_records.keys() - {MASKED_RECORD}:
            raise InvalidReply("reply carries arrays other than the masked input (plaintext?)")
        record = dict(content.config_records[SECAGG_RECORD])
        try:
            if wire.ADVERT in record:
                adv = wire.decode_advert(record, node)
                if adv.round_num == self.round_log.server_round + 1:
                    self._adverts.setdefault(adv.round_num, {})[node] = adv
            if wire.FAILED in record:
                raise InvalidReply(
                    f"client could not produce its masked input: {record[wire.FAILED]}"
                )
            round_num = wire.get_round(record, wire.MASKED)
            if MASKED_RECORD not in content.array_records:
                raise InvalidReply("no masked input")
            words = content.array_records[MASKED_RECORD][MASKED_ARRAY].numpy()
        except (ProtocolViolation, KeyError, ValueError) as exc:
            if isinstance(exc, InvalidReply):
                raise
            raise InvalidReply(f"malformed masked-input reply: {exc}") from None
        self._masked[node] = MaskedInput(node, round_num, words)
        self.round_log.client_metrics[node] = metrics
        return ValidReply(node, 0, [], metrics)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        srv, grid = self._round, self._grid
        self._masked = {}
        valid = self.screen_train_replies(replies)
        self.check_everyone_exhausted()
        if srv is None or grid is None:
            return None, None
        masked = {r.node_id: self._masked[r.node_id] for r in valid}
        try:
            unmask_requests = srv.receive_masked(masked)
        except SecAggAbort as exc:
            self._record(srv)
            self._abort(exc)
            return None, None
        finally:
            for node, reason in srv.rejected.items():
                self.round_log.rejected.setdefault(node, reason)
        parts: dict[int, wire.Wire] = {
            u: wire.encode_unmask_request(q) for u, q in unmask_requests.items()
        }
        nxt, later = self._pipeline_next(grid, server_round)
        if nxt is not None:
            for u, q in nxt.share_requests().items():
                parts.setdefault(u, {}).update(wire.encode_share_request(q))
        for u in later:
            parts.setdefault(u, {})[wire.ADVERTISE_REQ] = server_round + 2
        replies_by_node = self._stage(grid, parts, PHASE_UNMASK)
        self._collect_adverts(replies_by_node, server_round + 2)
        if nxt is not None:
            shares = self._decode(
                {u: w for u, w in replies_by_node.items() if wire.SHARE_REP in w},
                wire.decode_share_reply,
                PHASE_SHARE,
            )
            try:
                self._prepared[server_round + 1] = (nxt, self._close_shares(nxt, shares))
            except SecAggAbort as exc:
                self._prepared[server_round + 1] = exc
        unmasked = self._decode(
            {u: w for u, w in replies_by_node.items() if u in unmask_requests},
            wire.decode_unmask_reply,
            PHASE_UNMASK,
        )
        try:
            total = srv.receive_unmask(unmasked)
            weighted, weight = self.params.codec.decode(total)
            if weight <= 0:
                raise SecAggAbort(server_round, "unmask", "the survivors' total weight is zero")
        except SecAggAbort as exc:
            self._record(srv)
            self._abort(exc)
            return None, None
        self._record(srv)
        arrays = self._to_arrays(weighted / weight)
        self.round_log.aggregated = list(srv.survivors)
        metrics = {NUM_EXAMPLES_KEY: float(weight)}
        self.round_log.train_metrics = metrics
        return arrays, MetricRecord(metrics)

    def _pipeline_next(self, grid: Grid, server_round: int) -> tuple[ServerRound | None, list[int]]:
        """Round r+1's share stage rides on round r's unmask exchange.

        Its participants are the nodes sampled for r+1 that advertised keys for it in round
        r's train replies; a sampled node without keys (its reply was lost) sits r+1 out and
        is asked, in the same exchange, for keys for r+2. If that leaves fewer than
        min_train_nodes, round r+1 sets itself up with its own advertise/share exchanges.
        Returns (the prepared round or None, nodes to ask for keys for r+2).
        """
        nxt = server_round + 1
        if not self.settings.pipeline or (self.num_rounds is not None and nxt > self.num_rounds):
            return None, []
        nodes = self._sample_round(grid, nxt)
        adverts = self._adverts.get(nxt, {})
        ready = [u for u in nodes if u in adverts]
        if not ready or len(ready) < self.min_train_nodes:
            return None, []
        self._adverts.pop(nxt)
        later = [u for u in nodes if u not in adverts]
        try:
            return self._new_round(nxt, {u: adverts[u] for u in ready}), later
        except SecAggAbort as exc:
            self._prepared[nxt] = exc
            return None, later

    def _to_arrays(self, mean: np.ndarray) -> ArrayRecord:
        """The new global model in the layout's dtypes (integer buffers rounded)."""
        assert self._spec is not None
        return self._spec.unflatten(mean)

    def _record(self, srv: ServerRound) -> None:
        self.round_log.extra["secagg"] = {
            "graph": self.params.graph,
            "degree": self.params.degree(len(srv.participants)),
            "threshold": srv.threshold,
            "participants": len(srv.participants),
            "shared": len(srv.shared),
            "survivors": len(srv.survivors),
            "dropped": list(srv.dropped),
            "stage": srv.stage,
            "pipelined_next": (self.round_log.server_round + 1) in self._prepared,
            "ring_bits": self.params.codec.bits,
            "scale": self.params.codec.scale,
        }
