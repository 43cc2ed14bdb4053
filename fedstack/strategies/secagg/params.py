"""Protocol parameters shared by clients and server, and their per-round derivation.

Both ends derive the neighbourhood degree k and the threshold t from the same run config
and the round's participant count, so a server cannot quietly lower t for a client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedstack.crypto.prg import PRG_ALGORITHMS
from fedstack.crypto.quantise import FixedPointCodec

from .input_codec import InputCodec, as_input_codec

GRAPH_COMPLETE = "complete"
GRAPH_SPARSE = "sparse"
GRAPHS = (GRAPH_COMPLETE, GRAPH_SPARSE)
AUTO_DEGREE_LOG_FACTOR = 1.5
"""Sparse auto degree: k = 2 * ceil(1.5 * log2 n) (~3 log2 n; n=1000 -> 30, as in Bell et al.)."""
MIN_THRESHOLD = 2
SECURITY_SEMI_HONEST = "semi-honest"
SECURITY_MALICIOUS = "malicious"
SECURITIES = (SECURITY_SEMI_HONEST, SECURITY_MALICIOUS)


@dataclass(frozen=True)
class ProtocolParams:
    """Everything both sides must agree on; built from :class:`SecAggSettings`.

    ``threshold``: an int is a share count, a float in (0.5, 1] a fraction of the
    neighbourhood (the party plus its neighbours). A threshold above half the neighbourhood
    is required: otherwise a server could ask one half for a party's self-mask shares and
    the other half for its mask-key shares, and unmask that party's input.

    ``codec`` fixes the ring; ``input_codec`` (default: fixed point over ``codec``) turns
    updates into ring words (``input``). ``security``: ``semi-honest`` or ``malicious``
    (signed adverts, agreed graph seed, consistency check before unmasking).
    """

    codec: FixedPointCodec
    graph: str = GRAPH_COMPLETE
    neighbours: int | None = None
    threshold: int | float = 0.6
    prg: str = "aes"
    security: str = SECURITY_SEMI_HONEST
    input_codec: Any = None

    def __post_init__(self) -> None:
        if self.security not in SECURITIES:
            raise ValueError(f"security must be one of {SECURITIES}, got {self.security!r}")
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.prg not in PRG_ALGORITHMS:
            raise ValueError(f"prg must be one of {PRG_ALGORITHMS}, got {self.prg!r}")
        if self.neighbours is not None and (self.neighbours < 2 or self.neighbours % 2):
            raise ValueError(f"neighbours must be an even integer >= 2, got {self.neighbours}")
        if isinstance(self.threshold, bool):
            raise ValueError("threshold must be an int count or a float fraction")
        if isinstance(self.threshold, float) and not 0.5 < self.threshold <= 1.0:
            raise ValueError(f"threshold fraction must be in (0.5, 1], got {self.threshold}")
        if isinstance(self.threshold, int) and self.threshold < MIN_THRESHOLD:
            raise ValueError(f"threshold count must be >= {MIN_THRESHOLD}, got {self.threshold}")

    @property
    def input(self) -> InputCodec:
        """The codec updates are encoded with (its ``bits``/``dtype`` are the ring's)."""
        return as_input_codec(self.codec if self.input_codec is None else self.input_codec)

    @property
    def malicious(self) -> bool:
        return self.security == SECURITY_MALICIOUS

    def degree(self, n: int) -> int:
        """Number of neighbours of each party among n participants."""
        if self.graph == GRAPH_COMPLETE or n <= 2:
            return n - 1
        k = (
            self.neighbours
            if self.neighbours is not None
            else (2 * math.ceil(AUTO_DEGREE_LOG_FACTOR * math.log2(n)))
        )
        return min(k, n - 1)

    def neighbourhood_size(self, n: int) -> int:
        return self.degree(n) + 1

    def view_quorum(self, n: int) -> int:
        """q: how many members of P must sign one survivor view before anyone unmasks.

        The same fraction of P as t is of a neighbourhood, and more than half of P: honest
        members sign one view per round, so two views can both reach unmasking only if at
        least 2q - n members sign both (collude). Complete graph: q = t.
        """
        t, size = self.round_threshold(n), self.neighbourhood_size(n)
        return max(n // 2 + 1, math.ceil(n * t / size))

    def round_threshold(self, n: int) -> int:
        """t for a round with n participants; raises if it is unsafe or unreachable."""
        size = self.neighbourhood_size(n)
        t = (
            math.ceil(self.threshold * size)
            if isinstance(self.threshold, float)
            else int(self.threshold)
        )
        t = max(t, MIN_THRESHOLD)
        if t > size:
            raise ValueError(f"threshold t={t} exceeds the neighbourhood size {size} (n={n})")
        if 2 * t <= size:
            raise ValueError(f"threshold t={t} must exceed half the neighbourhood size {size}")
        return t
