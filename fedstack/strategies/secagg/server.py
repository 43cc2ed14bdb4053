"""Server side of one secure-aggregation round: routing, dropout tracking and unmasking.

The server never holds a client's plaintext input. It keeps a running ring sum of the
masked inputs (not the vectors), then removes the survivors' self masks and the pairwise
masks left by parties that dropped after sharing. Stages are strictly sequential: once the
masked-input stage is closed, a late masked input is rejected (accepting it after a
party's mask key was reconstructed would still not reveal it -- its self mask stays -- but
it would corrupt the sum).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np

from fedstack.crypto import signing
from fedstack.crypto.keys import KeyPair, derive_key, pair_keys
from fedstack.crypto.prg import accumulate
from fedstack.crypto.quantise import ring_reduce
from fedstack.crypto.shamir import SECRET_BYTES, ShamirError, reconstruct_many

from . import graph, statements
from .client import PURPOSE_MASK, PURPOSE_SELF_MASK
from .errors import ProtocolViolation, SecAggAbort
from .messages import (
    NONCE_BYTES,
    SEED_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    STAGE_CONSISTENCY,
    STAGE_MASKED,
    STAGE_REVEAL,
    STAGE_SHARE,
    STAGE_UNMASK,
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
    check_shares,
)
from .params import GRAPH_SPARSE, ProtocolParams

STAGE_DONE = "done"


@dataclass
class ServerRound:
    """State of one round on the server (lives in the strategy object)."""

    round_num: int
    params: ProtocolParams
    vector_len: int  # d + 1 ring words (coordinates + weight)
    adverts: dict[int, Advert]
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(SEED_BYTES))
    stage: str = STAGE_SHARE
    rejected: dict[int, str] = field(default_factory=dict)  # node -> reason, for the round log
    run_id: int = 0  # binds the signed statements of security=malicious

    def __post_init__(self) -> None:
        self.adverts = self._screen_adverts(self.adverts)
        self.participants = sorted(self.adverts)
        n = len(self.participants)
        if n > self.params.input.max_clients:
            raise SecAggAbort(
                self.round_num,
                STAGE_SHARE,
                f"{n} participants exceed max_clients={self.params.input.max_clients}, "
                "the bound under which the ring sum cannot wrap",
            )
        try:
            self.threshold = self.params.round_threshold(n)
        except ValueError as exc:
            raise SecAggAbort(self.round_num, STAGE_SHARE, f"{n} participants: {exc}") from exc
        self.reveals: dict[int, tuple[bytes, bytes]] = {}
        self.signatures: dict[int, bytes] = {}  # malicious: survivors' view signatures
        if self.params.malicious:
            # No party chooses the graph: the seed is H(D_P, every participant's nonce).
            self.p_digest = statements.participants_digest(
                self.run_id, self.round_num, self.adverts
            )
            if self.params.graph == GRAPH_SPARSE:
                self.stage = STAGE_REVEAL
                self.nbrs: dict[int, list[int]] = {}
            else:
                self.seed = statements.agreed_seed(self.run_id, self.round_num, self.p_digest, None)
        if self.stage != STAGE_REVEAL:
            self.nbrs = graph.neighbours(
                self.seed, self.round_num, self.participants, self.params.degree(n)
            )
        self.shared: list[int] = []  # U1
        self.survivors: list[int] = []  # U2
        self.dropped: list[int] = []  # U1 \ U2
        self._cts: dict[int, dict[int, bytes]] = {}
        self._total = np.zeros(self.vector_len, dtype=self.params.input.dtype)
        self._arrived: set[int] = set()  # senders of accepted masked inputs (U2 once closed)
        self._requests: dict[int, UnmaskRequest] = {}

    def _screen_adverts(self, adverts: dict[int, Advert]) -> dict[int, Advert]:
        """Drop malformed adverts and every party whose public key is not unique (a copied
        key must not abort the round for everyone)."""
        owners: dict[bytes, list[int]] = {}
        valid: dict[int, Advert] = {}
        for node, adv in adverts.items():
            try:
                adv.validate()
                if adv.node != node or adv.round_num != self.round_num:
                    raise ProtocolViolation(
                        f"advert of node {node} is for node {adv.node}, round {adv.round_num}"
                    )
            except ProtocolViolation as exc:
                self._reject(node, str(exc))
                continue
            if self.params.malicious and not self._signed_advert(node, adv):
                continue
            valid[node] = adv
            for key in (adv.enc_pk, adv.mask_pk, adv.signer):
                if key:
                    owners.setdefault(key, []).append(node)
        for nodes in owners.values():
            for node in nodes if len(nodes) > 1 else []:
                self._reject(node, "advert repeats a public key or signer of another party")
                valid.pop(node, None)
        return valid

    def _signed_advert(self, node: int, adv: Advert) -> bool:
        """A malicious-mode advert must be signed by the key it names (roster membership is
        for each client to judge against its own roster; the server cannot)."""
        if adv.signed and signing.verify(
            adv.signer, adv.signature, statements.advert_statement(self.run_id, adv)
        ):
            return True
        self._reject(node, "advert is unsigned or its signature does not verify")
        return False

    def _expect_stage(self, stage: str) -> None:
        if self.stage != stage:
            raise ProtocolViolation(
                f"round {self.round_num}: '{stage}' messages are not accepted "
                f"at stage '{self.stage}' (late or replayed)"
            )

    def _reject(self, node: int, reason: str) -> None:
        self.rejected[node] = reason

    # -- stage 0b (malicious, sparse): reveal the graph-seed nonces ----------------------
    def reveal_requests(self) -> dict[int, RevealRequest]:
        self._expect_stage(STAGE_REVEAL)
        return {
            u: RevealRequest(self.round_num, list(self.participants), self.adverts)
            for u in self.participants
        }

    def receive_reveals(self, replies: dict[int, RevealReply]) -> None:
        """Fix the agreed seed and the graph; abort if any participant did not reveal.

        Why abort instead of dropping the party: P (with its commitments) is fixed and every
        client checks that each member of P revealed over the same D_P; a seed without one
        nonce would be a seed the server could choose by choosing whom to leave out.
        """
        self._expect_stage(STAGE_REVEAL)
        for node, rep in replies.items():
            try:
                self._check_reveal(node, rep)
                self.reveals[node] = (rep.nonce, rep.signature)
            except ProtocolViolation as exc:
                self._reject(node, str(exc))
        missing = [u for u in self.participants if u not in self.reveals]
        if missing:
            self.stage = STAGE_DONE
            raise SecAggAbort(
                self.round_num,
                STAGE_REVEAL,
                f"{len(missing)} of {len(self.participants)} participants did not reveal their "
                "graph-seed nonce; the round needs fresh adverts",
            )
        nonces = {u: nonce for u, (nonce, _) in self.reveals.items()}
        self.seed = statements.agreed_seed(self.run_id, self.round_num, self.p_digest, nonces)
        self.nbrs = graph.neighbours(
            self.seed, self.round_num, self.participants, self.params.degree(len(nonces))
        )
        self.stage = STAGE_SHARE

    def _check_reveal(self, node: int, rep: RevealReply) -> None:
        adv = self.adverts.get(node)
        if adv is None or rep.node != node or rep.round_num != self.round_num:
            raise ProtocolViolation(f"reveal of {node} is not from a participant of this round")
        if (
            not isinstance(rep.nonce, bytes)
            or len(rep.nonce) != NONCE_BYTES
            or statements.commitment(rep.nonce) != adv.commit
            or not signing.verify(
                adv.signer,
                rep.signature,
                statements.reveal_statement(
                    self.run_id, self.round_num, node, rep.nonce, self.p_digest
                ),
            )
        ):
            raise ProtocolViolation(f"reveal of {node} does not open its commitment")

    # -- stage 1 -----------------------------------------------------------------------
    def share_requests(self) -> dict[int, ShareRequest]:
        self._expect_stage(STAGE_SHARE)
        out = {}
        malicious = self.params.malicious
        for u in self.participants:
            hood = [*self.nbrs[u], u]
            keys = (
                {}
                if malicious
                else {v: (self.adverts[v].enc_pk, self.adverts[v].mask_pk) for v in hood}
            )
            out[u] = ShareRequest(
                self.round_num,
                self.seed,
                list(self.participants),
                keys,
                self.adverts if malicious else {},
                self.reveals,
            )
        return out

    def receive_shares(self, replies: dict[int, ShareReply]) -> dict[int, MaskRequest]:
        """Close the share stage: fix U1 and route each party the ciphertexts addressed to it."""
        self._expect_stage(STAGE_SHARE)
        valid: dict[int, dict[int, bytes]] = {}
        for node, rep in replies.items():
            try:
                valid[node] = self._check_share_reply(node, rep)
            except ProtocolViolation as exc:
                self._reject(node, str(exc))
        u1 = set(valid)
        # Drop parties whose secrets could not be rebuilt: fewer than t of their
        # neighbourhood shared. Removing one can starve a neighbour, hence the loop.
        changed = True
        while changed:
            starved = {u for u in u1 if len(set(self.nbrs[u]) & u1) + 1 < self.threshold}
            changed = bool(starved)
            u1 -= starved
        if len(u1) < self.threshold:
            self.stage = STAGE_DONE
            raise SecAggAbort(
                self.round_num,
                STAGE_SHARE,
                f"{len(u1)} parties shared usable keys, below t={self.threshold}",
            )
        self.shared = sorted(u1)
        self._cts = {u: valid[u] for u in self.shared}
        self.stage = STAGE_MASKED
        return {
            u: MaskRequest(
                self.round_num,
                list(self.shared),
                {v: self._cts[v][u] for v in self.nbrs[u] if v in u1},
            )
            for u in self.shared
        }

    def _check_share_reply(self, node: int, rep: ShareReply) -> dict[int, bytes]:
        if node not in self.adverts:
            raise ProtocolViolation(f"share reply from non-participant {node}")
        if rep.node != node or rep.round_num != self.round_num:
            raise ProtocolViolation(
                f"share reply of {node} claims node {rep.node}, round {rep.round_num}"
            )
        if sorted(rep.ciphertexts) != self.nbrs[node]:
            raise ProtocolViolation(
                f"share reply of {node} is not addressed to exactly its neighbours"
            )
        for v, ct in rep.ciphertexts.items():
            if not isinstance(ct, bytes) or len(ct) != SHARE_CIPHERTEXT_BYTES:
                raise ProtocolViolation(f"share ciphertext {node}->{v} has a wrong size")
        return dict(rep.ciphertexts)

    # -- stage 2 -----------------------------------------------------------------------
    def receive_masked(self, replies: dict[int, MaskedInput]) -> dict[int, UnmaskRequest]:
        """Close the masked-input stage: fix survivors U2, add their vectors, ask for shares."""
        for node, rep in replies.items():
            self.add_masked(node, rep)
        return self.close_masked()

    def add_masked(self, node: int, rep: MaskedInput) -> bool:
        """Add one masked input as it arrives; False (and a logged reason) if rejected.

        Why one at a time: the server then holds the running sum only, never n vectors of
        d words (at n = 1000, d = 1e6 that is 4 GB against 4 MB).
        """
        self._expect_stage(STAGE_MASKED)
        try:
            if node in self._arrived:
                raise ProtocolViolation(f"second masked input from {node} in one round")
            self._check_masked(node, rep)
        except ProtocolViolation as exc:
            self._reject(node, str(exc))
            return False
        self._total += rep.words  # wraps mod 2^32/2^64 by design
        self._arrived.add(node)
        return True

    def close_masked(self) -> dict[int, UnmaskRequest]:
        """Fix survivors U2 (the accepted inputs) and ask each for the shares to unmask."""
        self._expect_stage(STAGE_MASKED)
        u2 = self._arrived
        ring_reduce(self._total, self.params.input.bits)
        self.stage = STAGE_UNMASK  # from here on, late masked inputs are rejected
        self.survivors = sorted(u2)
        self.dropped = sorted(set(self.shared) - u2)
        if len(u2) < self.threshold:
            self.stage = STAGE_DONE
            raise SecAggAbort(
                self.round_num,
                STAGE_MASKED,
                f"{len(u2)} masked inputs arrived, below t={self.threshold}",
            )
        self._feasible(u2, STAGE_MASKED)
        if self.params.malicious:
            quorum = self.params.view_quorum(len(self.participants))
            if len(u2) < quorum:
                self.stage = STAGE_DONE
                raise SecAggAbort(
                    self.round_num,
                    STAGE_MASKED,
                    f"{len(u2)} masked inputs arrived, below the view quorum {quorum} "
                    f"of {len(self.participants)} participants",
                )
            self.stage = STAGE_CONSISTENCY
            return {
                u: ConsistencyRequest(self.round_num, list(self.shared), list(self.survivors))
                for u in self.survivors
            }
        return self._unmask_requests()

    def _unmask_requests(self) -> dict[int, UnmaskRequest]:
        dropped, u2 = set(self.dropped), set(self.survivors)
        signed = self.signatures
        self._requests = {
            u: UnmaskRequest(
                self.round_num,
                sorted((set(self.nbrs[u]) & u2) | {u}),
                sorted(set(self.nbrs[u]) & dropped),
                signed,
            )
            for u in self.survivors
        }
        return dict(self._requests)

    # -- stage 2b (malicious): consistency check ---------------------------------------
    def view(self) -> bytes:
        """D_V of this round as the server presented it (what every survivor must sign)."""
        return statements.view_digest(
            self.run_id, self.round_num, self.p_digest, self.seed, self.shared, self.survivors
        )

    def receive_consistency(self, replies: dict[int, ConsistencyReply]) -> dict[int, UnmaskRequest]:
        """Collect every survivor's signature on the view, then ask for the shares.

        A survivor that does not sign aborts the round: honest holders reveal a survivor's
        self-mask share only with that survivor's own signature on the same view, and its
        masked input is already in the sum.
        """
        self._expect_stage(STAGE_CONSISTENCY)
        view = self.view()
        for node, rep in replies.items():
            adv = self.adverts.get(node)
            if (
                node in self.survivors
                and adv is not None
                and rep.node == node
                and rep.round_num == self.round_num
                and signing.verify(
                    adv.signer,
                    rep.signature,
                    statements.consistency_statement(self.run_id, self.round_num, node, view),
                )
            ):
                self.signatures[node] = rep.signature
            else:
                self._reject(node, "consistency signature missing or invalid")
        unsigned = [u for u in self.survivors if u not in self.signatures]
        if unsigned:
            self.stage = STAGE_DONE
            raise SecAggAbort(
                self.round_num,
                STAGE_CONSISTENCY,
                f"{len(unsigned)} of {len(self.survivors)} survivors did not sign the survivor "
                "view (refused or dropped)",
            )
        self.stage = STAGE_UNMASK
        return self._unmask_requests()

    def _check_masked(self, node: int, rep: MaskedInput) -> None:
        if node not in self.shared:
            raise ProtocolViolation(f"masked input from {node}, which is not in U1")
        if rep.node != node or rep.round_num != self.round_num:
            raise ProtocolViolation(
                f"masked input of {node} claims node {rep.node}, round {rep.round_num}"
            )
        w = rep.words
        if (
            not isinstance(w, np.ndarray)
            or w.dtype != self.params.input.dtype
            or w.shape != (self.vector_len,)
        ):
            raise ProtocolViolation(
                f"masked input of {node} must be {self.params.input.dtype} of shape "
                f"({self.vector_len},), got {getattr(w, 'dtype', type(w))} "
                f"{getattr(w, 'shape', '')}"
            )
        bits = self.params.input.bits
        if bits not in (32, 64) and (w >> np.asarray(bits, dtype=w.dtype)).any():
            raise ProtocolViolation(f"masked input of {node} has words outside Z_2^{bits}")

    def _feasible(self, holders_alive: set[int], stage: str) -> None:
        """Abort unless every secret to rebuild has >= t live holders."""
        t = self.threshold
        for u in self.survivors:
            if len((set(self.nbrs[u]) & holders_alive) | ({u} & holders_alive)) < t:
                self.stage = STAGE_DONE
                raise SecAggAbort(
                    self.round_num,
                    stage,
                    f"self mask of survivor {u} has fewer than t={t} live share holders "
                    f"({len(self.survivors)} survivors of {len(self.shared)})",
                )
        for u in self.dropped:
            if (
                set(self.nbrs[u]) & set(self.survivors)
                and len(set(self.nbrs[u]) & holders_alive) < t
            ):
                self.stage = STAGE_DONE
                raise SecAggAbort(
                    self.round_num,
                    stage,
                    f"mask key of dropped party {u} has fewer than t={t} live share holders",
                )

    # -- stage 3 -----------------------------------------------------------------------
    def receive_unmask(self, replies: dict[int, UnmaskReply]) -> np.ndarray:
        """Rebuild the needed secrets and return the ring sum of the survivors' inputs."""
        self._expect_stage(STAGE_UNMASK)
        valid: dict[int, UnmaskReply] = {}
        for node, rep in replies.items():
            try:
                self._check_unmask(node, rep)
                valid[node] = rep
            except ProtocolViolation as exc:
                self._reject(node, str(exc))
        u3 = set(valid)
        self._feasible(u3, STAGE_UNMASK)
        self.stage = STAGE_DONE
        seeds = self._rebuild(
            {u: sorted((set(self.nbrs[u]) | {u}) & u3) for u in self.survivors},
            lambda h, u: valid[h].self_shares[u],
        )
        keys = self._rebuild(
            {
                u: sorted(set(self.nbrs[u]) & u3)
                for u in self.dropped
                if set(self.nbrs[u]) & set(self.survivors)
            },
            lambda h, u: valid[h].key_shares[u],
        )
        r = self.round_num
        # -PRG(b_u) for every survivor u: its self mask.
        streams = [(derive_key(seed, PURPOSE_SELF_MASK, r, (u,)), -1) for u, seed in seeds.items()]
        survivors = set(self.survivors)
        for u, sk in keys.items():
            if KeyPair.from_private(sk).public != self.adverts[u].mask_pk:
                raise SecAggAbort(
                    r,
                    STAGE_UNMASK,
                    f"reconstructed mask key of {u} does not match "
                    "its advertised public key (inconsistent shares)",
                )
            peers = {v: self.adverts[v].mask_pk for v in sorted(set(self.nbrs[u]) & survivors)}
            # survivor v added +PRG(s_uv) if v < u, else -PRG(s_uv): take it back out.
            streams += [
                (key, -1 if v < u else 1)
                for v, key in pair_keys(sk, u, peers, PURPOSE_MASK, r).items()
            ]
        # Every check is done before the sum is touched; then one blocked pass over d.
        accumulate(self._total, streams, self.params.prg)
        return ring_reduce(self._total, self.params.input.bits)

    def _check_unmask(self, node: int, rep: UnmaskReply) -> None:
        req = self._requests.get(node)
        if req is None:
            raise ProtocolViolation(f"unmask reply from {node}, which was not asked")
        if rep.node != node or rep.round_num != self.round_num:
            raise ProtocolViolation(
                f"unmask reply of {node} claims node {rep.node}, round {rep.round_num}"
            )
        if sorted(rep.self_shares) != req.reveal_self or sorted(rep.key_shares) != req.reveal_key:
            raise ProtocolViolation(
                f"unmask reply of {node} does not answer exactly what was asked"
            )
        check_shares(rep.self_shares, f"unmask reply of {node}: self-mask share of")
        check_shares(rep.key_shares, f"unmask reply of {node}: mask-key share of")

    def _rebuild(self, holders: dict[int, list[int]], share_of) -> dict[int, bytes]:
        """Reconstruct each owner's secret from its first t live holders, all in one batch.

        (Each owner has its own holder set under a sparse graph; ``reconstruct_many``
        interpolates all of them in one vectorised pass.)
        """
        if not holders:
            return {}
        t = self.threshold
        index = {v: i + 1 for i, v in enumerate(self.participants)}
        owners = list(holders)
        xs = np.array([[index[h] for h in holders[u][:t]] for u in owners], dtype=np.uint64)
        ys = np.array([[share_of(h, u) for h in holders[u][:t]] for u in owners], dtype=np.uint32)
        try:
            rec = reconstruct_many(xs, ys)
        except ShamirError as exc:
            raise SecAggAbort(
                self.round_num, STAGE_UNMASK, f"share reconstruction failed: {exc}"
            ) from exc
        out = {u: rec[i].tobytes() for i, u in enumerate(owners)}
        assert all(len(secret) == SECRET_BYTES for secret in out.values())
        return out
