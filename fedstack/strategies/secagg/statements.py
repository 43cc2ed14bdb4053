"""What members sign under ``security=malicious``, and the digests both sides derive.

Every statement is ``signing.statement("secagg/<stage>", run_id, round, ...)``: bound to the
run, the round and the stage, so a signature can never be replayed in another run, round or
role. Server and clients compute the same digests from the same data; only clients sign.

* advert: (node, enc_pk, mask_pk, commit) -- the keys and the graph-seed commitment are the
  member's own;
* participants digest D_P = H(P, every advert of P): the participant set as every member saw it;
* reveal: (node, nonce, D_P) -- the nonce is released only for this exact P;
* seed: H(D_P, the nonces of P in id order) (sparse) or H(D_P) (complete graph): no single
  party, and not the server, chooses it;
* view digest D_V = H(D_P, seed, U1, U3) and the consistency statement (node, D_V).
"""

from __future__ import annotations

import hashlib

from fedstack.crypto import signing

from .messages import Advert

DOMAIN_ADVERT = "secagg/advert"
DOMAIN_PARTICIPANTS = "secagg/participants"
DOMAIN_REVEAL = "secagg/reveal"
DOMAIN_SEED = "secagg/seed"
DOMAIN_SHARED = "secagg/shared"
DOMAIN_VIEW = "secagg/view"
DOMAIN_CONSISTENCY = "secagg/consistency"


def commitment(nonce: bytes) -> bytes:
    """SHA-256(nonce): binds a client to its seed contribution before it sees the others'."""
    return hashlib.sha256(nonce).digest()


def advert_statement(run_id: int, adv: Advert) -> bytes:
    return signing.statement(
        DOMAIN_ADVERT, run_id, adv.round_num, adv.node, adv.enc_pk, adv.mask_pk, adv.commit
    )


def participants_digest(run_id: int, round_num: int, adverts: dict[int, Advert]) -> bytes:
    """D_P over the sorted participants and each one's full signed advert."""
    ids = sorted(adverts)
    body = b"".join(
        adverts[v].enc_pk + adverts[v].mask_pk + adverts[v].commit + adverts[v].signer
        for v in ids
    )
    return signing.digest(DOMAIN_PARTICIPANTS, run_id, round_num, ids, body)


def reveal_statement(
    run_id: int, round_num: int, node: int, nonce: bytes, p_digest: bytes
) -> bytes:
    return signing.statement(DOMAIN_REVEAL, run_id, round_num, node, nonce, p_digest)


def agreed_seed(
    run_id: int, round_num: int, p_digest: bytes, nonces: dict[int, bytes] | None
) -> bytes:
    """The round's graph seed: H(D_P, nonces of P sorted by id), or H(D_P) without reveals."""
    joined = b"".join(nonces[v] for v in sorted(nonces)) if nonces else b""
    return signing.digest(DOMAIN_SEED, run_id, round_num, p_digest, joined)


def shared_digest(run_id: int, round_num: int, shared: list[int]) -> bytes:
    """H(U1): what a client stores at masking time to recognise its U1 later."""
    return signing.digest(DOMAIN_SHARED, run_id, round_num, sorted(shared))


def view_digest(
    run_id: int,
    round_num: int,
    p_digest: bytes,
    seed: bytes,
    shared: list[int],
    survivors: list[int],
) -> bytes:
    """D_V = H(D_P, seed, U1, U3): the one survivor view a client signs in a round."""
    return signing.digest(
        DOMAIN_VIEW, run_id, round_num, p_digest, seed, sorted(shared), sorted(survivors)
    )


def consistency_statement(run_id: int, round_num: int, node: int, view: bytes) -> bytes:
    return signing.statement(DOMAIN_CONSISTENCY, run_id, round_num, node, view)
