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
    return {u: _ring_neighbours(order, pos, degree) for pos, u in enumerate(order)}


def neighbours_of(
    seed: bytes, round_num: int, participants: list[int], degree: int, node: int
) -> list[int]:
    """``neighbours(...)[node]`` without building every party's list.

    Why: a client needs only its own neighbourhood; building all n lists is O(n k) Python
    work per client per round, which at n = 1000 cost more than its k Shamir shares.
    """
    n = len(participants)
    if degree >= n - 1:
        return sorted(v for v in participants if v != node)
    if degree % 2:
        raise ValueError(f"sparse degree must be even, got {degree}")
    order = ring_order(seed, round_num, participants)
    return _ring_neighbours(order, order.index(node), degree)


def _ring_neighbours(order: list[int], pos: int, degree: int) -> list[int]:
    """The degree/2 ring neighbours on each side of position ``pos``, sorted."""
    n, half = len(order), degree // 2
    near = {order[(pos + d) % n] for d in range(1, half + 1)}
    near |= {order[(pos - d) % n] for d in range(1, half + 1)}
    return sorted(near)


def components(nbrs: dict[int, list[int]], members: set[int]) -> list[set[int]]:
    """Connected components of the graph restricted to ``members``.

    Why: the server can decode the sum of every component of the survivors' graph on its
    own (pairwise masks cancel inside a component), so each must hold at least the minimum
    cohort -- four dropouts that cut a k = 4 ring would otherwise expose a 4-client arc.
    """
    left, out = set(members), []
    while left:
        start = left.pop()
        comp, frontier = {start}, [start]
        while frontier:
            for v in nbrs.get(frontier.pop(), ()):
                if v in left:
                    left.discard(v)
                    comp.add(v)
                    frontier.append(v)
        out.append(comp)
    return out
