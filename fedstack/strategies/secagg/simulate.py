"""Run protocol rounds with simulated parties in one process (tests, cost model).

Each client's state goes through ``to_bytes``/``from_bytes`` around every handler, as it
does in deployment where every message may run in a fresh process. ``drop`` names, per
stage, the parties that stop answering from that stage on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .client import ClientState, SecAggClient, new_client_state
from .errors import ProtocolViolation
from .messages import STAGE_ADVERTISE, STAGE_MASKED, STAGE_SHARE, STAGE_UNMASK, Advert
from .params import ProtocolParams
from .server import ServerRound


@dataclass
class SimulatedFederation:
    """A set of parties whose states persist across rounds as serialised bytes."""

    params: ProtocolParams
    nodes: list[int]
    states: dict[int, bytes] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for u in self.nodes:
            self.states.setdefault(u, new_client_state(u).to_bytes())

    def call(self, node: int, handler: Callable[[SecAggClient], object]) -> object | None:
        """Run one handler on a freshly deserialised client; a refusal counts as a dropout."""
        client = SecAggClient(self.params, ClientState.from_bytes(self.states[node]))
        try:
            out = handler(client)
        except ProtocolViolation as exc:
            self.refusals.append(str(exc))
            return None
        self.states[node] = client.state.to_bytes()
        return out

    def advertise(self, round_num: int, nodes: list[int]) -> dict[int, Advert]:
        out = {u: self.call(u, lambda c: c.advertise(round_num)) for u in nodes}
        return {u: a for u, a in out.items() if a is not None}

    def run_round(
        self,
        round_num: int,
        inputs: Mapping[int, tuple[np.ndarray, int]],
        drop: Mapping[str, set[int]] | None = None,
        adverts: dict[int, Advert] | None = None,
    ) -> tuple[np.ndarray, int, ServerRound]:
        """One full round; returns (sum n_k w_k, sum n_k, the server round)."""
        drop = {k: set(v) for k, v in (drop or {}).items()}
        gone: set[int] = set()

        def alive(stage: str, nodes) -> list[int]:
            gone.update(drop.get(stage, set()))
            return [u for u in nodes if u not in gone]

        nodes = sorted(inputs)
        if adverts is None:
            adverts = self.advertise(round_num, alive(STAGE_ADVERTISE, nodes))
        d = len(next(iter(inputs.values()))[0])
        server = ServerRound(round_num, self.params, d + 1, adverts)
        reqs = server.share_requests()
        shares = {
            u: self.call(u, lambda c, r=reqs[u]: c.share(r)) for u in alive(STAGE_SHARE, reqs)
        }
        mreqs = server.receive_shares({u: s for u, s in shares.items() if s is not None})
        masked = {
            u: self.call(u, lambda c, r=mreqs[u], x=inputs[u]: c.mask(r, *x))
            for u in alive(STAGE_MASKED, mreqs)
        }
        ureqs = server.receive_masked({u: m for u, m in masked.items() if m is not None})
        unmasked = {
            u: self.call(u, lambda c, r=ureqs[u]: c.unmask(r)) for u in alive(STAGE_UNMASK, ureqs)
        }
        total = server.receive_unmask({u: m for u, m in unmasked.items() if m is not None})
        weighted, weight = self.params.codec.decode(total)
        return weighted, weight, server
