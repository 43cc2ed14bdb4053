"""Run protocol rounds with simulated parties in one process (tests, benchmarks).

Each client's state goes through ``to_bytes``/``from_bytes`` around every handler, as it
does in deployment where every message may run in a fresh process. ``drop`` names, per
stage, the parties that stop answering from that stage on. Every party runs the real
:class:`SecAggClient` / :class:`ServerRound` code: key agreement, Shamir shares, AES-GCM
share encryption, PRG masks, quantisation and unmasking with dropout recovery.

Rounds stream: a client's input is made when it masks, and its masked input goes to the
server at once, so a round holds O(d) words, not n inputs of d words -- what lets the
benchmark run 1000 clients at d = 1e6 in one process. A :class:`Meter` can time each
party's own calls (its stages) and trace their memory.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from fedstack.policy import PolicyRefusal

from .client import ClientState, ClientTrust, SecAggClient, new_client_state
from .errors import ProtocolViolation
from .messages import (
    STAGE_ADVERTISE,
    STAGE_CONSISTENCY,
    STAGE_MASKED,
    STAGE_REVEAL,
    STAGE_SHARE,
    STAGE_UNMASK,
    Advert,
)
from .params import ProtocolParams
from .server import ServerRound

SERVER = "server"
"""The :class:`Meter` party name of the server (clients are metered by node id)."""

T = TypeVar("T")


@dataclass
class PartyCost:
    """One party's cost over a round: the sum over its calls, and its memory high-water mark.

    ``peak_bytes``: the most traced memory the party's calls held at once above what the
    process held before its first call -- its own retained state (``held_bytes``: net growth
    over its calls so far) plus the transient peak of the call in progress. Memory freed by
    other parties in between is not credited, so this errs high, never low.
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0
    calls: int = 0
    held_bytes: int = 0
    peak_bytes: int = 0


class Meter:
    """Wall and CPU seconds (and, with ``trace_memory``, traced memory) per party.

    CPU seconds (``time.process_time``) are what one core spent, whatever else runs on the
    machine; wall seconds include waiting for a shared core. Memory is traced with
    ``tracemalloc`` (NumPy reports its buffers to it), started by the meter if needed.
    """

    def __init__(self, trace_memory: bool = False) -> None:
        self.trace_memory = trace_memory
        self.parties: dict[object, PartyCost] = {}
        self.stages: dict[tuple[str, str], PartyCost] = {}  # ("server"|"client", stage): sums
        if trace_memory and not tracemalloc.is_tracing():
            tracemalloc.start()

    def run(self, party: object, fn: Callable[[], T], stage: str = "") -> T:
        """Call ``fn`` and charge its time and memory to ``party`` (and its time to ``stage``)."""
        cost = self.parties.setdefault(party, PartyCost())
        kind = SERVER if party == SERVER else "client"
        per_stage = self.stages.setdefault((kind, stage), PartyCost())
        if self.trace_memory:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn()
        finally:
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            for acc in (cost, per_stage):
                acc.wall_s += wall
                acc.cpu_s += cpu
                acc.calls += 1
            if self.trace_memory:
                current, peak = tracemalloc.get_traced_memory()
                cost.peak_bytes = max(cost.peak_bytes, cost.held_bytes + peak - before)
                cost.held_bytes += current - before


@dataclass
class SimulatedFederation:
    """A set of parties whose states persist across rounds as serialised bytes.

    ``trusts``: each node's identity, roster and policy (required by security=malicious);
    a node without one gets a bare :class:`ClientTrust` of ``run_id``.
    """

    params: ProtocolParams
    nodes: list[int]
    states: dict[int, bytes] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)
    trusts: dict[int, ClientTrust] = field(default_factory=dict)
    run_id: int = 0

    def __post_init__(self) -> None:
        for u in self.nodes:
            self.states.setdefault(u, new_client_state(u).to_bytes())

    def call(
        self,
        node: int,
        handler: Callable[[SecAggClient], object],
        meter: Meter | None = None,
        stage: str = "",
    ) -> object | None:
        """Run one handler on a freshly deserialised client; a refusal counts as a dropout."""

        def step() -> object | None:
            trust = self.trusts.get(node) or ClientTrust(self.run_id)
            try:
                client = SecAggClient(self.params, ClientState.from_bytes(self.states[node]), trust)
                out = handler(client)
            except (ProtocolViolation, PolicyRefusal) as exc:
                self.refusals.append(str(exc))
                return None
            self.states[node] = client.state.to_bytes()
            return out

        return step() if meter is None else meter.run(node, step, stage)

    def advertise(
        self, round_num: int, nodes: list[int], meter: Meter | None = None
    ) -> dict[int, Advert]:
        out = {
            u: self.call(u, lambda c: c.advertise(round_num), meter, STAGE_ADVERTISE) for u in nodes
        }
        return {u: a for u, a in out.items() if a is not None}

    def run_round(
        self,
        round_num: int,
        inputs: Mapping[int, tuple[np.ndarray, int]],
        drop: Mapping[str, set[int]] | None = None,
        adverts: dict[int, Advert] | None = None,
        meter: Meter | None = None,
    ) -> tuple[np.ndarray, int, ServerRound]:
        """One full round; returns (sum n_k w_k, sum n_k, the server round)."""
        d = len(next(iter(inputs.values()))[0])
        return self.run_round_streaming(
            round_num, sorted(inputs), inputs.__getitem__, d, drop, adverts, meter
        )

    def run_round_streaming(
        self,
        round_num: int,
        nodes: list[int],
        make_input: Callable[[int], tuple[np.ndarray, int]],
        d: int,
        drop: Mapping[str, set[int]] | None = None,
        adverts: dict[int, Advert] | None = None,
        meter: Meter | None = None,
    ) -> tuple[np.ndarray, int, ServerRound]:
        """One full round in which ``make_input(u)`` gives u's (values, weight) when u masks.

        ``make_input`` runs outside the meter (it stands for local training). Each masked
        input is added to the server's running sum as soon as it is made.
        """
        drop = {k: set(v) for k, v in (drop or {}).items()}
        gone: set[int] = set()

        def alive(stage: str, members) -> list[int]:
            gone.update(drop.get(stage, set()))
            return [u for u in members if u not in gone]

        def on_server(fn: Callable[[], T], stage: str) -> T:
            return fn() if meter is None else meter.run(SERVER, fn, stage)

        if adverts is None:
            adverts = self.advertise(round_num, alive(STAGE_ADVERTISE, nodes), meter)
        vector_len = self.params.input.words(d)
        server = on_server(
            lambda: ServerRound(round_num, self.params, vector_len, adverts, run_id=self.run_id),
            STAGE_SHARE,
        )
        if server.stage == STAGE_REVEAL:
            rreqs = on_server(server.reveal_requests, STAGE_REVEAL)
            reveals = {
                u: self.call(u, lambda c, r=rreqs[u]: c.reveal(r), meter, STAGE_REVEAL)
                for u in alive(STAGE_REVEAL, rreqs)
            }
            on_server(
                lambda: server.receive_reveals({u: r for u, r in reveals.items() if r}),
                STAGE_REVEAL,
            )
        reqs = on_server(server.share_requests, STAGE_SHARE)
        shares = {
            u: self.call(u, lambda c, r=reqs[u]: c.share(r), meter, STAGE_SHARE)
            for u in alive(STAGE_SHARE, reqs)
        }
        mreqs = on_server(
            lambda: server.receive_shares({u: s for u, s in shares.items() if s is not None}),
            STAGE_SHARE,
        )
        for u in alive(STAGE_MASKED, mreqs):
            values, weight = make_input(u)
            masked = self.call(
                u, lambda c, r=mreqs[u], x=values, w=weight: c.mask(r, x, w), meter, STAGE_MASKED
            )
            if masked is not None:
                on_server(lambda u=u, m=masked: server.add_masked(u, m), STAGE_MASKED)
        ureqs = on_server(server.close_masked, STAGE_MASKED)
        if self.params.malicious:
            signed = {
                u: self.call(u, lambda c, r=ureqs[u]: c.consistency(r), meter, STAGE_CONSISTENCY)
                for u in alive(STAGE_CONSISTENCY, ureqs)
            }
            ureqs = on_server(
                lambda: server.receive_consistency({u: s for u, s in signed.items() if s}),
                STAGE_CONSISTENCY,
            )
        unmasked = {
            u: self.call(u, lambda c, r=ureqs[u]: c.unmask(r), meter, STAGE_UNMASK)
            for u in alive(STAGE_UNMASK, ureqs)
        }
        total = on_server(
            lambda: server.receive_unmask({u: m for u, m in unmasked.items() if m is not None}),
            STAGE_UNMASK,
        )
        weighted, weight = self.params.codec.decode(total)
        return weighted, weight, server
