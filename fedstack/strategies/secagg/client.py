"""Client side of the double-masking protocol, with fully serialisable state.

Every handler loads nothing but its :class:`ClientState` and returns the reply, so the
state can live in Flower's ``context.state`` between messages that each run in a fresh
process. Each round's record only moves forward (advertised -> shared -> masked) and is
deleted after unmasking, so keys, seeds and answered requests can never be reused or
replayed: a request that does not match the record's stage is refused.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from fedstack.crypto.aead import AeadError, associated_data, open_sealed, seal
from fedstack.crypto.keys import KEY_BYTES, KeyPair, derive_key, pair_keys
from fedstack.crypto.prg import accumulate
from fedstack.crypto.quantise import ring_reduce
from fedstack.crypto.shamir import SECRET_BYTES, SHARE_BYTES, split

from . import graph
from .errors import ProtocolViolation
from .messages import (
    SEED_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    SHARE_HEADER_BYTES,
    Advert,
    MaskedInput,
    MaskRequest,
    ShareReply,
    ShareRequest,
    UnmaskReply,
    UnmaskRequest,
    check_bytes,
    check_id_list,
    check_node_id,
)
from .params import ProtocolParams

# HKDF purposes / AEAD domain: one per use of a key, so no derived key serves two uses.
PURPOSE_SHARE_ENC = "share-enc"
PURPOSE_MASK = "pair-mask"
PURPOSE_SELF_MASK = "self-mask"
AD_SHARE = "secagg-share"

REC_ADVERTISED = "advertised"
REC_SHARED = "shared"
REC_MASKED = "masked"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


@dataclass
class RoundRecord:
    """One round's secrets and what this client has already done in it."""

    stage: str
    enc_sk: str  # base64 of raw private keys/seeds: JSON-serialisable as is
    mask_sk: str
    self_seed: str = ""
    neighbours: list[int] = field(default_factory=list)
    peer_mask_pk: dict[str, str] = field(default_factory=dict)
    peer_enc_pk: dict[str, str] = field(default_factory=dict)
    shares: dict[str, str] = field(default_factory=dict)  # owner -> b64(self share || key share)
    shared: list[int] = field(default_factory=list)  # U1 ∩ (neighbours + self), from the server
    threshold: int = 0  # t of the round, fixed when sharing


@dataclass
class ClientState:
    """All protocol state of one client; (de)serialises to bytes for ``context.state``."""

    node: int
    rounds: dict[str, RoundRecord] = field(default_factory=dict)
    closed_through: int = -1  # requests for rounds <= this are stale

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientState:
        raw = json.loads(data.decode())
        rounds = {k: RoundRecord(**v) for k, v in raw["rounds"].items()}
        return cls(node=int(raw["node"]), rounds=rounds, closed_through=int(raw["closed_through"]))


class SecAggClient:
    """Stateless handlers over a :class:`ClientState` (mutated in place)."""

    def __init__(self, params: ProtocolParams, state: ClientState) -> None:
        self.params = params
        self.state = state

    @property
    def node(self) -> int:
        return self.state.node

    # -- helpers -----------------------------------------------------------------------
    def _record(self, round_num: int, stage: str, action: str) -> RoundRecord:
        rec = self.state.rounds.get(str(round_num))
        if rec is None:
            raise ProtocolViolation(
                f"node {self.node}: {action} for round {round_num} refused: "
                "no open round (stale, replayed or never advertised)"
            )
        if rec.stage != stage:
            raise ProtocolViolation(
                f"node {self.node}: {action} for round {round_num} refused: "
                f"round is at stage '{rec.stage}', expected '{stage}' (replay?)"
            )
        return rec

    def _close_before(self, round_num: int) -> None:
        """Forget every round older than ``round_num``: it can no longer complete."""
        for key in [k for k in self.state.rounds if int(k) < round_num]:
            del self.state.rounds[key]
        self.state.closed_through = max(self.state.closed_through, round_num - 1)

    # -- stage 0: advertise ------------------------------------------------------------
    def advertise(self, round_num: int) -> Advert:
        """Fresh key pairs for ``round_num``; asked again before sharing (the first reply was
        lost), it repeats the same public keys -- no private key has been used yet."""
        rec = self.state.rounds.get(str(round_num))
        if rec is not None and rec.stage == REC_ADVERTISED:
            return Advert(
                self.node,
                round_num,
                KeyPair.from_private(_unb64(rec.enc_sk)).public,
                KeyPair.from_private(_unb64(rec.mask_sk)).public,
            )
        if round_num <= self.state.closed_through or rec is not None:
            raise ProtocolViolation(
                f"node {self.node}: keys for round {round_num} were already "
                "used or the round is closed"
            )
        self._close_before(round_num - 1)
        enc, mask = KeyPair.generate(), KeyPair.generate()
        self.state.rounds[str(round_num)] = RoundRecord(
            stage=REC_ADVERTISED, enc_sk=_b64(enc.private), mask_sk=_b64(mask.private)
        )
        return Advert(self.node, round_num, enc.public, mask.public)

    # -- stage 1: share ----------------------------------------------------------------
    def share(self, req: ShareRequest) -> ShareReply:
        """Shamir-share a fresh self-mask seed and the mask key; encrypt per neighbour."""
        rec = self._record(req.round_num, REC_ADVERTISED, "share")
        check_bytes(req.seed, SEED_BYTES, "graph seed")
        participants = check_id_list(req.participants, "participants")
        if self.node not in participants:
            raise ProtocolViolation(f"node {self.node}: not among the round's participants")
        n = len(participants)
        if n > self.params.codec.max_clients:
            raise ProtocolViolation(
                f"node {self.node}: {n} participants exceed max_clients="
                f"{self.params.codec.max_clients}; the masked sum could wrap"
            )
        try:
            t = self.params.round_threshold(n)
        except ValueError as exc:
            raise ProtocolViolation(f"node {self.node}: refusing round with n={n}: {exc}") from exc
        nbrs = graph.neighbours_of(
            req.seed, req.round_num, participants, self.params.degree(n), self.node
        )
        expected = sorted([*nbrs, self.node])
        if sorted(int(k) for k in req.keys) != expected:
            raise ProtocolViolation(
                f"node {self.node}: share request carries keys for the wrong "
                "set of parties (not this node's neighbourhood)"
            )
        own = (
            KeyPair.from_private(_unb64(rec.enc_sk)).public,
            KeyPair.from_private(_unb64(rec.mask_sk)).public,
        )
        if tuple(req.keys[self.node]) != own:
            raise ProtocolViolation(
                f"node {self.node}: share request misstates this node's own keys"
            )
        seen: set[bytes] = set()
        for v in nbrs:
            enc_pk, mask_pk = req.keys[v]
            check_bytes(enc_pk, KEY_BYTES, f"enc_pk of {v}")
            check_bytes(mask_pk, KEY_BYTES, f"mask_pk of {v}")
            if {enc_pk, mask_pk} & (seen | set(own)) or enc_pk == mask_pk:
                raise ProtocolViolation(f"node {self.node}: duplicate public key in share request")
            seen |= {enc_pk, mask_pk}
        index = {v: i + 1 for i, v in enumerate(participants)}
        self_seed = os.urandom(SECRET_BYTES)  # b_u: fresh every round
        secrets = np.frombuffer(self_seed + _unb64(rec.mask_sk), dtype=np.uint8).reshape(
            2, SECRET_BYTES
        )
        shares = split(secrets, len(expected), t, np.array([index[h] for h in expected]))
        enc_keys = pair_keys(
            _unb64(rec.enc_sk),
            self.node,
            {v: req.keys[v][0] for v in nbrs},
            PURPOSE_SHARE_ENC,
            req.round_num,
        )
        out: dict[int, bytes] = {}
        for col, h in enumerate(expected):
            body = shares[0, col].astype("<u4").tobytes() + shares[1, col].astype("<u4").tobytes()
            if h == self.node:
                rec.shares[str(h)] = _b64(body)
                continue
            header = b"".join(x.to_bytes(8, "big") for x in (self.node, h, req.round_num))
            out[h] = seal(
                enc_keys[h], header + body, associated_data(AD_SHARE, req.round_num, self.node, h)
            )
        rec.stage = REC_SHARED
        rec.threshold = t
        rec.self_seed = _b64(self_seed)
        rec.neighbours = nbrs
        rec.peer_enc_pk = {str(v): _b64(req.keys[v][0]) for v in nbrs}
        rec.peer_mask_pk = {str(v): _b64(req.keys[v][1]) for v in nbrs}
        return ShareReply(self.node, req.round_num, out)

    # -- stage 2: masked input ---------------------------------------------------------
    def mask(self, req: MaskRequest, values: np.ndarray, weight: int) -> MaskedInput:
        """Decrypt the routed shares, then return encode(values, weight) + masks."""
        rec = self._record(req.round_num, REC_SHARED, "masked input")
        shared = check_id_list(req.shared, "shared set U1")
        if self.node not in shared:
            raise ProtocolViolation(f"node {self.node}: server says this node did not share")
        live = sorted(set(rec.neighbours) & set(shared))
        if sorted(int(s) for s in req.ciphertexts) != live:
            raise ProtocolViolation(
                f"node {self.node}: routed ciphertexts do not match the "
                "neighbours in U1 (missing, extra or duplicated senders)"
            )
        if len(live) + 1 < rec.threshold:
            raise ProtocolViolation(
                f"node {self.node}: only {len(live) + 1} parties of its "
                f"neighbourhood shared, below t={rec.threshold}"
            )
        enc_keys = pair_keys(
            _unb64(rec.enc_sk),
            self.node,
            {v: _unb64(rec.peer_enc_pk[str(v)]) for v in live},
            PURPOSE_SHARE_ENC,
            req.round_num,
        )
        for v in live:
            ct = check_bytes(req.ciphertexts[v], SHARE_CIPHERTEXT_BYTES, f"ciphertext from {v}")
            try:
                pt = open_sealed(
                    enc_keys[v], ct, associated_data(AD_SHARE, req.round_num, v, self.node)
                )
            except AeadError as exc:
                raise ProtocolViolation(f"node {self.node}: share from {v}: {exc}") from exc
            header = b"".join(x.to_bytes(8, "big") for x in (v, self.node, req.round_num))
            if pt[:SHARE_HEADER_BYTES] != header:
                raise ProtocolViolation(f"node {self.node}: share from {v} carries a wrong header")
            rec.shares[str(v)] = _b64(pt[SHARE_HEADER_BYTES:])
        codec = self.params.codec
        words = codec.encode(values, weight)
        seeds = pair_keys(
            _unb64(rec.mask_sk),
            self.node,
            {v: _unb64(rec.peer_mask_pk[str(v)]) for v in live},
            PURPOSE_MASK,
            req.round_num,
        )
        self_key = derive_key(_unb64(rec.self_seed), PURPOSE_SELF_MASK, req.round_num, (self.node,))
        # + PRG(b_u), then +PRG(s_uv) if u < v else -PRG(s_uv): all k + 1 streams in one pass.
        streams = [(self_key, 1)] + [(seeds[v], 1 if self.node < v else -1) for v in live]
        accumulate(words, streams, self.params.prg)
        ring_reduce(words, codec.bits)
        rec.stage = REC_MASKED
        # Only U1 ∩ the neighbourhood is needed again: the state stays O(k), not O(n).
        rec.shared = sorted([*live, self.node])
        self._close_before(req.round_num)
        return MaskedInput(self.node, req.round_num, words)

    # -- stage 3: unmask ---------------------------------------------------------------
    def unmask(self, req: UnmaskRequest) -> UnmaskReply:
        """Reveal self-mask shares of survivors and mask-key shares of dropped parties.

        Refuses a request that asks for both kinds for one party, that does not split
        this node's live neighbourhood exactly into survivors and dropped parties, or
        that leaves fewer than t survivors in the neighbourhood. One answer per round.
        """
        rec = self._record(req.round_num, REC_MASKED, "unmask")
        reveal_self = check_id_list(req.reveal_self, "reveal_self")
        reveal_key = check_id_list(req.reveal_key, "reveal_key")
        both = set(reveal_self) & set(reveal_key)
        if both:
            raise ProtocolViolation(
                f"node {self.node}: refusing to reveal both the self-mask and "
                f"the mask-key shares of parties {sorted(both)}"
            )
        if self.node not in reveal_self:
            raise ProtocolViolation(
                f"node {self.node}: unmask request does not list this node as a survivor"
            )
        live = set(rec.neighbours) & set(rec.shared) | {self.node}
        if set(reveal_self) | set(reveal_key) != live:
            raise ProtocolViolation(
                f"node {self.node}: unmask request does not partition its live "
                "neighbourhood into survivors and dropped parties"
            )
        if len(reveal_self) < rec.threshold:
            raise ProtocolViolation(
                f"node {self.node}: {len(reveal_self)} survivors in its neighbourhood, "
                f"below t={rec.threshold}"
            )
        self_shares: dict[int, np.ndarray] = {}
        key_shares: dict[int, np.ndarray] = {}
        for v in reveal_self:
            self_shares[v] = np.frombuffer(
                _unb64(rec.shares[str(v)])[:SHARE_BYTES], dtype="<u4"
            ).astype(np.uint32)
        for v in reveal_key:
            key_shares[v] = np.frombuffer(
                _unb64(rec.shares[str(v)])[SHARE_BYTES:], dtype="<u4"
            ).astype(np.uint32)
        del self.state.rounds[str(req.round_num)]  # one answer per round; secrets forgotten
        self.state.closed_through = max(self.state.closed_through, req.round_num)
        return UnmaskReply(self.node, req.round_num, self_shares, key_shares)


def new_client_state(node: int) -> ClientState:
    """Empty state for a node id (validated)."""
    return ClientState(node=check_node_id(node, "node id"))
