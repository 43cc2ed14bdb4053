"""Client side of the double-masking protocol, with fully serialisable state.

Every handler loads nothing but its :class:`ClientState` and returns the reply, so the
state can live in Flower's ``context.state`` between messages that each run in a fresh
process. Each round's record only moves forward (advertised -> [revealed] -> shared ->
masked -> [consistent]; the bracketed stages under ``security=malicious``) and is deleted
after unmasking, so keys, seeds and answered requests can never be reused or replayed: a
request that does not match the record's stage is refused. Under ``security=malicious`` the
record also holds the client's own view of the round (D_P, the agreed seed, H(U1), the
signed survivor view), and every later request is judged against it, never taken on trust.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedstack.crypto import signing
from fedstack.crypto.aead import AeadError, associated_data, open_sealed, seal
from fedstack.crypto.keys import KEY_BYTES, KeyPair, derive_key, pair_keys
from fedstack.crypto.prg import accumulate
from fedstack.crypto.quantise import ring_reduce
from fedstack.crypto.shamir import SECRET_BYTES, SHARE_BYTES, split

from . import graph, statements
from .errors import InputOutOfBounds, ProtocolViolation
from .input_codec import CodecContext, public_round_seed
from .messages import (
    NONCE_BYTES,
    SEED_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    SHARE_HEADER_BYTES,
    Advert,
    ConsistencyReply,
    ConsistencyRequest,
    MaskedInput,
    MaskRequest,
    RevealReply,
    RevealRequest,
    ShareReply,
    ShareRequest,
    UnmaskReply,
    UnmaskRequest,
    check_bytes,
    check_id_list,
    check_node_id,
)
from .params import GRAPH_SPARSE, ProtocolParams

# HKDF purposes / AEAD domain: one per use of a key, so no derived key serves two uses.
PURPOSE_SHARE_ENC = "share-enc"
PURPOSE_MASK = "pair-mask"
PURPOSE_SELF_MASK = "self-mask"
AD_SHARE = "secagg-share"

REC_ADVERTISED = "advertised"
REC_REVEALED = "revealed"  # malicious, sparse: nonce released for one participant set
REC_SHARED = "shared"
REC_MASKED = "masked"
REC_CONSISTENT = "consistent"  # malicious: the survivor view is signed (once per round)
DEFAULT_MIN_COHORT = 3
"""Minimum cohort of the consistency check when the client is given no node policy."""


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
    # security=malicious: the client's own view of the round, each part fixed once.
    nonce: str = ""  # graph-seed contribution (committed to in the advert)
    p_digest: str = ""  # D_P of the participant set it revealed for / shared with
    seed: str = ""  # the agreed graph seed
    participants: list[int] = field(default_factory=list)  # P (for the connectivity check)
    signers: dict[str, str] = field(default_factory=dict)  # party of P -> its member key
    u1_digest: str = ""  # H(U1) of the mask request it masked under
    view: str = ""  # D_V it signed
    view_sig: str = ""  # its signature on D_V (repeated verbatim if asked again)
    survivors: list[int] = field(default_factory=list)  # U3 ∩ (neighbours + self)
    u3: list[int] = field(default_factory=list)  # U3 of the signed view (for the quorum)


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


@dataclass(frozen=True)
class ClientTrust:
    """Whom a client is and whom it trusts; needed by ``security=malicious``.

    ``identity`` signs (``.public``, ``.sign(msg)``: a :class:`fedstack.consortium.Identity`),
    ``roster`` verifies (``.member_by_public(pub)``: a :class:`fedstack.consortium.Roster`),
    ``policy`` (a :class:`fedstack.policy.NodePolicy`: ``.check_secagg(...)``,
    ``.min_cohort``) bounds every round in both modes; ``run_id`` binds every signature.
    """

    run_id: int = 0
    identity: Any = None
    roster: Any = None
    policy: Any = None


class SecAggClient:
    """Stateless handlers over a :class:`ClientState` (mutated in place)."""

    def __init__(
        self, params: ProtocolParams, state: ClientState, trust: ClientTrust | None = None
    ) -> None:
        self.params = params
        self.state = state
        self.trust = trust or ClientTrust()
        if params.malicious and (self.trust.identity is None or self.trust.roster is None):
            raise ProtocolViolation(
                f"node {state.node}: security=malicious needs this node's signing identity "
                "and a roster (node config identity-key/roster, or the run's consortium in "
                "simulation)",
                "identity",
            )

    @property
    def run_id(self) -> int:
        return int(self.trust.run_id)

    @property
    def min_cohort(self) -> int:
        policy = self.trust.policy
        return int(policy.min_cohort) if policy is not None else DEFAULT_MIN_COHORT

    @property
    def _revealing(self) -> bool:
        """Malicious sparse rounds agree on the graph seed by commit-reveal."""
        return self.params.malicious and self.params.graph == GRAPH_SPARSE

    @property
    def node(self) -> int:
        return self.state.node

    # -- helpers -----------------------------------------------------------------------
    def _record(self, round_num: int, stage: str, action: str) -> RoundRecord:
        rec = self.state.rounds.get(str(round_num))
        if rec is None:
            raise ProtocolViolation(
                f"node {self.node}: {action} for round {round_num} refused: "
                "no open round (stale, replayed or never advertised)",
                "stale",
            )
        if rec.stage != stage:
            raise ProtocolViolation(
                f"node {self.node}: {action} for round {round_num} refused: "
                f"round is at stage '{rec.stage}', expected '{stage}' (replay?)",
                "stale",
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
            return self._advert(round_num, rec)
        if round_num <= self.state.closed_through or rec is not None:
            raise ProtocolViolation(
                f"node {self.node}: keys for round {round_num} were already "
                "used or the round is closed",
                "stale",
            )
        self._close_before(round_num - 1)
        enc, mask = KeyPair.generate(), KeyPair.generate()
        rec = RoundRecord(
            stage=REC_ADVERTISED, enc_sk=_b64(enc.private), mask_sk=_b64(mask.private)
        )
        if self.params.malicious:
            rec.nonce = _b64(os.urandom(NONCE_BYTES))
        self.state.rounds[str(round_num)] = rec
        return self._advert(round_num, rec)

    def _advert(self, round_num: int, rec: RoundRecord) -> Advert:
        """The record's advert; signed (deterministic Ed25519) under security=malicious."""
        adv = Advert(
            self.node,
            round_num,
            KeyPair.from_private(_unb64(rec.enc_sk)).public,
            KeyPair.from_private(_unb64(rec.mask_sk)).public,
        )
        if not self.params.malicious:
            return adv
        identity = self.trust.identity
        unsigned = Advert(
            adv.node, adv.round_num, adv.enc_pk, adv.mask_pk,
            statements.commitment(_unb64(rec.nonce)), identity.public,
        )
        sig = identity.sign(statements.advert_statement(self.run_id, unsigned))
        return Advert(
            adv.node, adv.round_num, adv.enc_pk, adv.mask_pk, unsigned.commit, unsigned.signer, sig
        )

    # -- malicious, sparse: reveal the graph-seed nonce --------------------------------
    def reveal(self, req: RevealRequest) -> RevealReply:
        """Release this round's nonce, signed over D_P, for exactly one participant set.

        Asked again for the same P (a lost reply), it repeats the answer; for another P it
        refuses: the server cannot collect nonces for several participant sets and pick the
        graph it likes.
        """
        if not self._revealing:
            raise ProtocolViolation(
                f"node {self.node}: reveal requested outside security=malicious sparse", "stale"
            )
        participants = check_id_list(req.participants, "participants")
        if sorted(req.adverts) != participants:
            raise ProtocolViolation(f"node {self.node}: reveal request adverts do not match P")
        rec = self.state.rounds.get(str(req.round_num))
        p_digest = statements.participants_digest(self.run_id, req.round_num, req.adverts)
        if rec is not None and rec.stage == REC_REVEALED:
            if _unb64(rec.p_digest) != p_digest:
                raise ProtocolViolation(
                    f"node {self.node}: nonce of round {req.round_num} already revealed for "
                    "another participant set",
                    "view",
                )
        else:
            rec = self._record(req.round_num, REC_ADVERTISED, "reveal")
            self._check_participants(req.round_num, rec, participants, req.adverts)
        nonce = _unb64(rec.nonce)
        sig = self.trust.identity.sign(
            statements.reveal_statement(self.run_id, req.round_num, self.node, nonce, p_digest)
        )
        rec.stage = REC_REVEALED
        rec.p_digest = _b64(p_digest)
        return RevealReply(self.node, req.round_num, nonce, sig)

    def _check_participants(
        self, round_num: int, rec: RoundRecord, participants: list[int], adverts: dict[int, Advert]
    ) -> None:
        """This node is in P with its own advert unchanged, and P is not below the cohort."""
        if self.node not in participants:
            raise ProtocolViolation(f"node {self.node}: not among the round's participants")
        if adverts.get(self.node) != self._advert(round_num, rec):
            raise ProtocolViolation(
                f"node {self.node}: the participant set misstates this node's own advert", "keys"
            )
        if len(participants) < self.min_cohort:
            raise ProtocolViolation(
                f"node {self.node}: {len(participants)} participants, below the minimum "
                f"cohort {self.min_cohort}",
                "cohort",
            )

    def _verified_adverts(
        self, req: ShareRequest, rec: RoundRecord, participants: list[int]
    ) -> tuple[bytes, bytes]:
        """Check every advert of P and the seed reveals; return (D_P, the agreed seed).

        Every advert must verify against this node's own roster, each member may speak for
        one party only, this node's own advert must be unchanged; with reveals, each nonce
        must open its commitment and be signed over the same D_P this node revealed for.
        """
        adverts = req.adverts
        if sorted(adverts) != participants:
            raise ProtocolViolation(
                f"node {self.node}: share request lacks signed adverts of P", "signature"
            )
        self._check_participants(req.round_num, rec, participants, adverts)
        signers: set[bytes] = set()
        for v in participants:
            adv = adverts[v]
            adv.validate()
            if not adv.signed or adv.node != v or adv.round_num != req.round_num:
                raise ProtocolViolation(f"node {self.node}: advert of {v} is unsigned or misplaced",
                                        "signature")
            if self.trust.roster.member_by_public(adv.signer) is None:
                raise ProtocolViolation(
                    f"node {self.node}: advert of {v} is signed by a key outside this node's "
                    "roster", "signature")
            if adv.signer in signers:
                raise ProtocolViolation(
                    f"node {self.node}: one roster member signs adverts of several parties "
                    "(Sybils)", "signature")
            signers.add(adv.signer)
            if not signing.verify(
                adv.signer, adv.signature, statements.advert_statement(self.run_id, adv)
            ):
                raise ProtocolViolation(
                    f"node {self.node}: advert of {v} has an invalid signature", "signature"
                )
        p_digest = statements.participants_digest(self.run_id, req.round_num, adverts)
        if not self._revealing:
            return p_digest, statements.agreed_seed(self.run_id, req.round_num, p_digest, None)
        if _unb64(rec.p_digest) != p_digest:
            raise ProtocolViolation(
                f"node {self.node}: share request names another participant set than the one "
                "this node revealed its nonce for", "view")
        if sorted(req.reveals) != participants:
            raise ProtocolViolation(
                f"node {self.node}: share request lacks the seed reveal of some participant",
                "signature",
            )
        nonces = {}
        for v in participants:
            nonce, sig = req.reveals[v]
            check_bytes(nonce, NONCE_BYTES, f"nonce of {v}")
            if statements.commitment(nonce) != adverts[v].commit or not signing.verify(
                adverts[v].signer,
                sig,
                statements.reveal_statement(self.run_id, req.round_num, v, nonce, p_digest),
            ):
                raise ProtocolViolation(
                    f"node {self.node}: seed reveal of {v} does not open its commitment or is "
                    "not signed over this participant set", "signature")
            nonces[v] = nonce
        return p_digest, statements.agreed_seed(self.run_id, req.round_num, p_digest, nonces)

    # -- stage 1: share ----------------------------------------------------------------
    def share(self, req: ShareRequest) -> ShareReply:
        """Shamir-share a fresh self-mask seed and the mask key; encrypt per neighbour."""
        rec = self._record(
            req.round_num, REC_REVEALED if self._revealing else REC_ADVERTISED, "share"
        )
        check_bytes(req.seed, SEED_BYTES, "graph seed")
        participants = check_id_list(req.participants, "participants")
        if self.node not in participants:
            raise ProtocolViolation(f"node {self.node}: not among the round's participants")
        n = len(participants)
        if n > self.params.input.max_clients:
            raise ProtocolViolation(
                f"node {self.node}: {n} participants exceed max_clients="
                f"{self.params.input.max_clients}; the masked sum could wrap",
                "cohort",
            )
        seed = req.seed
        keys = req.keys
        if self.params.malicious:
            p_digest, seed = self._verified_adverts(req, rec, participants)
            if req.seed != seed:
                raise ProtocolViolation(
                    f"node {self.node}: the server's graph seed is not the agreed one", "view"
                )
            keys = {v: (a.enc_pk, a.mask_pk) for v, a in req.adverts.items()}
        try:
            t = self.params.round_threshold(n)
        except ValueError as exc:
            raise ProtocolViolation(
                f"node {self.node}: refusing round with n={n}: {exc}", "threshold"
            ) from exc
        if self.trust.policy is not None:  # t and k recomputed here, never read from the server
            self.trust.policy.check_secagg(
                security=self.params.security,
                threshold=t,
                neighbourhood=self.params.neighbourhood_size(n),
                cohort=n,
            )
        nbrs = graph.neighbours_of(
            seed, req.round_num, participants, self.params.degree(n), self.node
        )
        expected = sorted([*nbrs, self.node])
        if self.params.malicious:
            keys = {v: keys[v] for v in expected}
        if sorted(int(k) for k in keys) != expected:
            raise ProtocolViolation(
                f"node {self.node}: share request carries keys for the wrong "
                "set of parties (not this node's neighbourhood)",
                "keys",
            )
        own = (
            KeyPair.from_private(_unb64(rec.enc_sk)).public,
            KeyPair.from_private(_unb64(rec.mask_sk)).public,
        )
        if tuple(keys[self.node]) != own:
            raise ProtocolViolation(
                f"node {self.node}: share request misstates this node's own keys", "keys"
            )
        seen: set[bytes] = set()
        for v in nbrs:
            enc_pk, mask_pk = keys[v]
            check_bytes(enc_pk, KEY_BYTES, f"enc_pk of {v}")
            check_bytes(mask_pk, KEY_BYTES, f"mask_pk of {v}")
            if {enc_pk, mask_pk} & (seen | set(own)) or enc_pk == mask_pk:
                raise ProtocolViolation(
                    f"node {self.node}: duplicate public key in share request", "keys"
                )
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
            {v: keys[v][0] for v in nbrs},
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
        rec.peer_enc_pk = {str(v): _b64(keys[v][0]) for v in nbrs}
        rec.peer_mask_pk = {str(v): _b64(keys[v][1]) for v in nbrs}
        if self.params.malicious:
            rec.p_digest = _b64(p_digest)
            rec.seed = _b64(seed)
            rec.participants = participants
            rec.signers = {str(v): _b64(req.adverts[v].signer) for v in participants}
        return ShareReply(self.node, req.round_num, out)

    # -- stage 2: masked input ---------------------------------------------------------
    def codec_context(
        self, req: MaskRequest, global_values: np.ndarray | None = None
    ) -> CodecContext:
        """The public context an input codec encodes this round's update under."""
        rec = self.state.rounds.get(str(req.round_num))
        seed = (
            _unb64(rec.seed)
            if rec is not None and rec.seed
            else public_round_seed(self.run_id, req.round_num)
        )
        return CodecContext(req.round_num, seed, len(req.shared), global_values)

    def mask(self, req: MaskRequest, values: np.ndarray, weight: int) -> MaskedInput:
        """Decrypt the routed shares, then return encode(values, weight) + masks."""
        return self.mask_encoded(
            req, lambda ctx: self.params.input.encode(values, weight, ctx)
        )

    def mask_encoded(self, req: MaskRequest, encode) -> MaskedInput:
        """Check the request and the routed shares, then mask ``encode(codec context)``.

        ``encode`` runs only once the request is known to be valid (training is costly and
        must not run for a refused request).
        """
        rec = self._record(req.round_num, REC_SHARED, "masked input")
        shared = check_id_list(req.shared, "shared set U1")
        if self.node not in shared:
            raise ProtocolViolation(
                f"node {self.node}: server says this node did not share", "view"
            )
        live = sorted(set(rec.neighbours) & set(shared))
        if sorted(int(s) for s in req.ciphertexts) != live:
            raise ProtocolViolation(
                f"node {self.node}: routed ciphertexts do not match the "
                "neighbours in U1 (missing, extra or duplicated senders)"
            )
        if len(live) + 1 < rec.threshold:
            raise ProtocolViolation(
                f"node {self.node}: only {len(live) + 1} parties of its "
                f"neighbourhood shared, below t={rec.threshold}",
                "threshold",
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
        codec = self.params.input
        words = np.asarray(encode(self.codec_context(req)))
        if words.dtype != codec.dtype or words.ndim != 1:
            raise ValueError(f"input codec returned {words.dtype} {words.shape}, not {codec.dtype}")
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
        if self.params.malicious:
            rec.u1_digest = _b64(statements.shared_digest(self.run_id, req.round_num, shared))
        self._close_before(req.round_num)
        return MaskedInput(self.node, req.round_num, words)

    # -- malicious: consistency check --------------------------------------------------
    def consistency(self, req: ConsistencyRequest) -> ConsistencyReply:
        """Sign the survivor view (P, seed, U1, U3) once per round, after checking it.

        U1 must be the set this node masked under; U3 (who sent masked inputs) must be a
        subset of U1 that contains this node, at least t of its neighbourhood and at least
        the minimum cohort -- and every connected component of the graph on U3 must hold
        the minimum cohort, or the server could decode a small component's sum. Asked
        again for the same view it repeats its signature; for another view it refuses.
        """
        if not self.params.malicious:
            raise ProtocolViolation(
                f"node {self.node}: consistency check outside security=malicious", "stale"
            )
        shared = check_id_list(req.shared, "shared set U1")
        survivors = check_id_list(req.survivors, "survivor set U3")
        rec = self.state.rounds.get(str(req.round_num))
        if rec is not None and rec.stage == REC_CONSISTENT:
            view = statements.view_digest(
                self.run_id, req.round_num, _unb64(rec.p_digest), _unb64(rec.seed), shared,
                survivors,
            )
            if view != _unb64(rec.view):
                raise ProtocolViolation(
                    f"node {self.node}: already signed another survivor view for round "
                    f"{req.round_num}", "view")
            return ConsistencyReply(self.node, req.round_num, _unb64(rec.view_sig))
        rec = self._record(req.round_num, REC_MASKED, "consistency")
        if statements.shared_digest(self.run_id, req.round_num, shared) != _unb64(rec.u1_digest):
            raise ProtocolViolation(
                f"node {self.node}: U1 differs from the set this node masked under", "view"
            )
        u3 = set(survivors)
        if not u3 <= set(shared) or self.node not in u3:
            raise ProtocolViolation(
                f"node {self.node}: U3 is not a subset of U1 containing this node", "view"
            )
        alive = sorted(set(rec.shared) & u3)
        if len(alive) < rec.threshold:
            raise ProtocolViolation(
                f"node {self.node}: {len(alive)} survivors in its neighbourhood, below "
                f"t={rec.threshold}", "threshold")
        if len(u3) < self.min_cohort:
            raise ProtocolViolation(
                f"node {self.node}: {len(u3)} survivors, below the minimum cohort "
                f"{self.min_cohort}", "cohort")
        n = len(rec.participants)
        nbrs = graph.neighbours(
            _unb64(rec.seed), req.round_num, rec.participants, self.params.degree(n)
        )
        small = [c for c in graph.components(nbrs, u3) if len(c) < self.min_cohort]
        if small:
            raise ProtocolViolation(
                f"node {self.node}: the graph on U3 has a component of {min(map(len, small))} "
                f"parties, below the minimum cohort {self.min_cohort}", "connectivity")
        check_survivors = getattr(self.params.input, "check_survivors", None)
        if check_survivors is not None:
            # An input codec that relies on the survivors' number (dp=distributed: each
            # client added 1/n_min of the noise) refuses a view the server could unmask
            # with less than the planned noise; U1 was checked against what it masked under.
            try:
                check_survivors(len(u3), len(shared))
            except InputOutOfBounds as exc:
                raise ProtocolViolation(f"node {self.node}: {exc}", "cohort") from exc
        quorum = self.params.view_quorum(n)
        if len(u3) < quorum:
            raise ProtocolViolation(
                f"node {self.node}: {len(u3)} survivors cannot give the view quorum of {quorum} "
                f"signatures (of {n} participants)", "threshold")
        view = statements.view_digest(
            self.run_id, req.round_num, _unb64(rec.p_digest), _unb64(rec.seed), shared, survivors
        )
        sig = self.trust.identity.sign(
            statements.consistency_statement(self.run_id, req.round_num, self.node, view)
        )
        rec.stage = REC_CONSISTENT
        rec.view = _b64(view)
        rec.view_sig = _b64(sig)
        rec.survivors = alive
        rec.u3 = survivors
        return ConsistencyReply(self.node, req.round_num, sig)

    # -- stage 3: unmask ---------------------------------------------------------------
    def unmask(self, req: UnmaskRequest) -> UnmaskReply:
        """Reveal self-mask shares of survivors and mask-key shares of dropped parties.

        Refuses a request that asks for both kinds for one party, that does not split
        this node's live neighbourhood exactly into survivors and dropped parties, or
        that leaves fewer than t survivors in the neighbourhood. One answer per round.
        """
        if self.params.malicious:
            return self._unmask_view(req)
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
        return self._answer(req.round_num, rec, reveal_self, reveal_key)

    def _unmask_view(self, req: UnmaskRequest) -> UnmaskReply:
        r"""Malicious unmasking: reveal what this node's own signed view says, or nothing.

        Requires the signature of every survivor of its neighbourhood (U3 ∩ N[u], at least
        t, distinct members, checked at sharing) on the view this node signed -- a self-mask
        share of v is revealed only if v itself signed the same (U1, U3) -- and signatures of
        at least the view quorum q of distinct members of U3 (``ProtocolParams.view_quorum``),
        so no second view of the round can reach unmasking unless 2q - |P| members collude
        (honest members sign once). Reveals self-mask
        shares for U3 ∩ N[u] and mask-key shares for (U1 ∩ N(u)) \ U3, computed from the
        stored view; the request's lists must agree. One answer per round.
        """
        rec = self._record(req.round_num, REC_CONSISTENT, "unmask")
        view = _unb64(rec.view)

        def signed(v: int) -> bool:
            sig = req.signatures.get(v)
            return sig is not None and signing.verify(
                _unb64(rec.signers[str(v)]),
                sig,
                statements.consistency_statement(self.run_id, req.round_num, v, view),
            )

        for v in rec.survivors:
            if not signed(v):
                raise ProtocolViolation(
                    f"node {self.node}: no valid signature of survivor {v} on this node's "
                    "survivor view", "signature")
        quorum = self.params.view_quorum(len(rec.participants))
        hood = set(rec.survivors)
        count = len(hood) + sum(1 for v in rec.u3 if v not in hood and signed(v))
        if count < quorum:
            raise ProtocolViolation(
                f"node {self.node}: {count} members signed this node's survivor view, below "
                f"the view quorum {quorum}", "signature")
        if len(rec.survivors) < rec.threshold:
            raise ProtocolViolation(
                f"node {self.node}: fewer than t={rec.threshold} signed survivors", "threshold"
            )
        reveal_self = list(rec.survivors)
        reveal_key = sorted(set(rec.shared) - set(rec.survivors))
        if (list(req.reveal_self), list(req.reveal_key)) != (reveal_self, reveal_key):
            raise ProtocolViolation(
                f"node {self.node}: unmask request asks for other shares than its signed view "
                "implies", "view")
        return self._answer(req.round_num, rec, reveal_self, reveal_key)

    def _answer(
        self, round_num: int, rec: RoundRecord, reveal_self: list[int], reveal_key: list[int]
    ) -> UnmaskReply:
        """The shares, after which the round's secrets are forgotten (one answer per round)."""
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
        del self.state.rounds[str(round_num)]  # one answer per round; secrets forgotten
        self.state.closed_through = max(self.state.closed_through, round_num)
        return UnmaskReply(self.node, round_num, self_shares, key_shares)


def new_client_state(node: int) -> ClientState:
    """Empty state for a node id (validated)."""
    return ClientState(node=check_node_id(node, "node id"))
