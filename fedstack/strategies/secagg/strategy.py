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

``security: malicious`` adds the consistency exchange (every survivor signs the survivor
view before any share is revealed); the next round's graph-seed reveals ride on it, so the
steady state needs 3 exchanges (train + masked input, consistency + reveals, unmask +
shares); a round that sets itself up adds advertise, (sparse) reveal and share. Flower's
SecAgg+ needs 4 protocol exchanges every round.

No federated evaluation under secagg: per-client evaluate replies (loss, accuracy,
validation size) would leave in the clear; central evaluation stays. After unmasking, the
sum must lie within what honest clipped inputs can produce (``InputCodec.check_bounds``),
else the round aborts.

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
from fedstack.strategies.runtime import is_deployment

from . import wire
from .errors import InputOutOfBounds, ProtocolViolation, SecAggAbort
from .input_codec import FixedPointInput
from .messages import STAGE_REVEAL, Advert, MaskedInput, MaskRequest
from .mod import MASKED_ARRAY, MASKED_RECORD, SECAGG_RECORD
from .params import ProtocolParams
from .server import ServerRound
from .settings import SecAggSettings

PHASE_ADVERTISE = "secagg-advertise"
PHASE_REVEAL = "secagg-reveal"
PHASE_SHARE = "secagg-share"
PHASE_CONSISTENCY = "secagg-consistency"
PHASE_UNMASK = "secagg-unmask"
CONSORTIUM_DIR = "consortium"
"""Run-directory subfolder of the simulation consortium (security=malicious, simulation)."""


class SecAggFedAvg(WeightedFedAvg):
    """Weighted FedAvg over the Bonawitz et al. double-masking protocol (optionally SecAgg+)."""

    server_sees_model = True
    visibility = (
        "only the sum over the surviving clients of their quantised n_k * w_k and "
        "the sum of their n_k (never one client's update, example count, loss or "
        "evaluation metrics: no federated evaluation runs under secagg), which clients "
        "took part or dropped, and the global model"
    )

    def __init__(
        self,
        *,
        settings: SecAggSettings | None = None,
        params: ProtocolParams | None = None,
        num_rounds: int | None = None,
        run_dir: Path | None = None,
        num_clients: int | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.run_dir = run_dir
        self.num_clients = num_clients
        #: security=malicious in simulation: the consortium directory the run proposes
        self._consortium: str | None = None
        self._run_id = 0
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
            run_dir=run_dir,
            num_clients=int(cfg.num_clients),
            **common,
        )

    def _prepare_trust(self, grid: Grid) -> None:
        """Bind signatures to the run; in simulation under security=malicious, create the
        run's consortium (one identity per partition) and propose it to the nodes.

        A node that pins its own roster ignores the proposal; deployment never proposes one
        (each node must pin a roster and an identity-key in its node config).
        """
        run = getattr(grid, "run", None)
        self._run_id = int(getattr(run, "run_id", 0) or 0)
        if not self.params.malicious or self._consortium is not None or is_deployment(grid):
            return
        if self.run_dir is None or not self.num_clients:
            return
        from fedstack.consortium import simulation_consortium

        directory = Path(self.run_dir) / CONSORTIUM_DIR
        simulation_consortium(directory, int(self.num_clients))
        self._consortium = str(directory.resolve())

    def _part(self, part: wire.Wire) -> wire.Wire:
        if self._consortium is not None:
            part[wire.CONSORTIUM] = self._consortium
        return part

    # ------------------------------------------------------------------ helpers

    def _abort(self, exc: SecAggAbort) -> None:
        self.round_log.aborted = f"{exc} -- keeping the previous global model"
        log.warning("round %s: %s", self.round_log.server_round, self.round_log.aborted)

    def _stage(self, grid: Grid, parts: dict[int, wire.Wire], phase: str) -> dict[int, dict]:
        """One protocol exchange; returns each valid reply's secagg record, notes the rest."""
        messages = [
            Message(
                RecordDict({"config": self._config, SECAGG_RECORD: ConfigRecord(self._part(p))}),
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
        if srv.stage == STAGE_REVEAL:
            replies = self._stage(
                grid,
                {u: wire.encode_reveal_request(q) for u, q in srv.reveal_requests().items()},
                PHASE_REVEAL,
            )
            self._close_reveals(srv, replies)
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
        srv = ServerRound(
            server_round,
            self.params,
            self.params.input.words(self._spec.size),
            adverts,
            run_id=self._run_id,
        )
        for node, reason in srv.rejected.items():
            self._note_dropout(node, reason)
        return srv

    def _close_reveals(self, srv: ServerRound, replies: dict[int, dict]) -> None:
        """Fix the agreed graph seed (raises SecAggAbort if a participant did not reveal)."""
        reveals = self._decode(
            {u: w for u, w in replies.items() if wire.REVEAL_REP in w},
            wire.decode_reveal_reply,
            PHASE_REVEAL,
        )
        try:
            srv.receive_reveals(reveals)
        finally:
            for node, reason in srv.rejected.items():
                self._note_dropout(node, reason)

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
        self._prepare_trust(grid)
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
            part = self._part(wire.encode_mask_request(req))
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
        nxt, later = self._pipeline_next(grid, server_round)
        aborted: SecAggAbort | None = None
        if self.params.malicious:
            unmask_requests, nxt, aborted = self._consistency(
                grid, server_round, srv, unmask_requests, nxt
            )
        parts: dict[int, wire.Wire] = {
            u: wire.encode_unmask_request(q) for u, q in unmask_requests.items()
        }
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
        if aborted is not None:
            self._record(srv)
            self._abort(aborted)
            return None, None
        unmasked = self._decode(
            {u: w for u, w in replies_by_node.items() if u in unmask_requests},
            wire.decode_unmask_reply,
            PHASE_UNMASK,
        )
        codec = self.params.input
        try:
            total = srv.receive_unmask(unmasked)
            if isinstance(codec, FixedPointInput):
                weighted, weight_sum = self.params.codec.decode(total)
                self.computed_view = {"ring_sum": total, "weighted_sum": weighted,
                                      "weight_sum": np.asarray(weight_sum)}  # audit mode's record
            else:
                self.computed_view = {"ring_sum": total}
            try:  # both modes: a sum honest inputs cannot produce keeps the previous model
                codec.check_bounds(total, len(srv.survivors))
                mean, weight = codec.decode(total, len(srv.survivors))
            except InputOutOfBounds as exc:
                raise SecAggAbort(server_round, "unmask", str(exc)) from exc
        except SecAggAbort as exc:
            self._record(srv)
            self._abort(exc)
            return None, None
        self._record(srv)
        arrays = self._to_arrays(mean)
        self.round_log.aggregated = list(srv.survivors)
        metrics = {NUM_EXAMPLES_KEY: float(weight)}
        self.round_log.train_metrics = metrics
        return arrays, MetricRecord(metrics)

    def _consistency(
        self,
        grid: Grid,
        server_round: int,
        srv: ServerRound,
        requests: dict,
        nxt: ServerRound | None,
    ) -> tuple[dict, ServerRound | None, SecAggAbort | None]:
        """security=malicious: every survivor signs the survivor view; the next round's
        graph-seed reveals ride on the same exchange.

        Returns (this round's unmask requests, the next round if still usable, this round's
        abort or None). An aborted round still lets the next round's shares ride on the
        unmask exchange: its clients have revealed their nonces already.
        """
        parts: dict[int, wire.Wire] = {
            u: wire.encode_consistency_request(q) for u, q in requests.items()
        }
        revealing = nxt is not None and nxt.stage == STAGE_REVEAL
        if revealing:
            for u, q in nxt.reveal_requests().items():
                parts.setdefault(u, {}).update(wire.encode_reveal_request(q))
        replies = self._stage(grid, parts, PHASE_CONSISTENCY)
        if revealing:
            try:
                self._close_reveals(nxt, replies)
            except SecAggAbort as exc:
                self._prepared[server_round + 1] = exc
                nxt = None
        signatures = self._decode(
            {u: w for u, w in replies.items() if u in requests and wire.CONSISTENCY_REP in w},
            wire.decode_consistency_reply,
            PHASE_CONSISTENCY,
        )
        try:
            return srv.receive_consistency(signatures), nxt, None
        except SecAggAbort as exc:
            return {}, nxt, exc
        finally:
            for node, reason in srv.rejected.items():
                self.round_log.rejected.setdefault(node, reason)

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

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """None under secagg: per-client evaluate replies would leave in the clear (central
        evaluation of the public global model stays)."""
        return []

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
            "ring_bits": self.params.input.bits,
            "scale": self.params.codec.scale,
            "security": self.params.security,
        }
