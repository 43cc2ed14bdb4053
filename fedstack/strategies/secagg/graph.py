"""Neighbour graphs: the complete graph or a random k-regular Harary graph (SecAgg+).

The sparse graph places the participants on a ring in a pseudo-random order derived from
the round's public seed and links each to its k/2 nearest ring neighbours on each side
(the Harary graph H_{k,n} under a random relabelling, as in Bell et al. 2020). Every party
computes the same graph from (seed, round, participants) alone: no graph is ever sent.
"""

from __future__ import annotations

import numpy as np

from fedstack.crypto.keys import derive_key
from fedstack.crypto.prg import expand

GRAPH_PURPOSE = "graph"


def ring_order(seed: bytes, round_num: int, participants: list[int]) -> list[int]:
    """Participants (sorted first) permuted by public pseudo-random keys; stable and portable."""
    ids = sorted(participants)
    keys = expand(derive_key(seed, GRAPH_PURPOSE, round_num, ()), len(ids), np.uint64)
    return [ids[i] for i in np.argsort(keys, kind="stable")]


def neighbours(
    seed: bytes, round_num: int, participants: list[int], degree: int
) -> dict[int, list[int]]:
    """Map each participant to its sorted neighbour list (itself excluded)."""
    n = len(participants)
    if degree >= n - 1:
        ids = sorted(participants)
        return {u: [v for v in ids if v != u] for u in ids}
    if degree % 2:
        raise ValueError(f"sparse degree must be even, got {degree}")
    order = ring_order(seed, round_num, participants)
    half = degree // 2
    out: dict[int, list[int]] = {}
    for pos, u in enumerate(order):
        near = {order[(pos + d) % n] for d in range(1, half + 1)}
        near |= {order[(pos - d) % n] for d in range(1, half + 1)}
        out[u] = sorted(near)
    return out
