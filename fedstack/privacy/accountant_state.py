"""A client's privacy accounting state, in a form that survives processes.

Why: in deployment every Flower message runs in a fresh ClientApp process, so an Opacus
accountant object cannot simply live on; Flower's own Opacus example builds a new engine
every round and so reports one round's ε instead of the total. Here the accountant's full
history (noise multiplier, sample rate, steps) plus the client's fixed δ and σ is kept as
flat lists of numbers: exactly what a Flower ``ConfigRecord`` stores, and what this module
rebuilds an Opacus accountant from. Nothing here imports Flower.

Floats survive a ConfigRecord (and JSON) bit for bit, so consecutive rounds with the same
(σ, q) merge into one history entry, as Opacus's own ``step`` does; ε after R rounds is
then *the same computation* as Opacus's one-shot ε for all steps together.

Besides that merged history, the state keeps one *event* per trained round (server round,
steps). Merged histories cannot tell "3 rounds" from "2 rounds, then a restart, then 1
round"; the events can, which is what lets a client reconcile its own state with the copy
the server's ledger holds (`covers`, `combined`) without dropping or double-counting a round.
Opacus is imported only where ε is computed, so the server's ledger can read states cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fedstack.privacy.settings import ACCOUNTANTS

if TYPE_CHECKING:
    import numpy as np
    from opacus.accountants import IAccountant

#: Version tag of the serialised form; bump on an incompatible change.
STATE_FORMAT = 1

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
RoundEvent = tuple[int, int]  # (server round, steps trained in it)


class PrivacyStateError(ValueError):
    """Stored privacy state that cannot be trusted (never silently reset)."""


@dataclass(frozen=True)
class PrivacyState:
    """Everything a client must remember between rounds to account honestly."""

    mechanism: str
    history: tuple[HistoryEntry, ...] = ()
    #: δ fixed at the first round (it must not drift between rounds).
    delta: float | None = None
    #: σ fixed at the first round (derived once from a target ε, or given).
    noise_multiplier: float | None = None
    #: Server rounds this client trained in, and its ε after each of them.
    rounds: tuple[int, ...] = ()
    epsilons: tuple[float, ...] = field(default=())
    #: Steps trained in each of `rounds` (None: a record written before they were kept).
    round_steps: tuple[int, ...] | None = ()

    def __post_init__(self) -> None:
        if self.mechanism not in ACCOUNTANTS:
            raise PrivacyStateError(
                f"accountant mechanism {self.mechanism!r} is not one of {ACCOUNTANTS}"
            )
        if self.round_steps is not None:
            if len(self.round_steps) != len(self.rounds):
                raise PrivacyStateError(
                    f"privacy state has {len(self.rounds)} rounds but steps for "
                    f"{len(self.round_steps)}"
                )
            if sum(self.round_steps) > self.steps:
                raise PrivacyStateError(
                    f"privacy state rounds account for {sum(self.round_steps)} steps, its "
                    f"history for only {self.steps}"
                )

    # -- accounting ---------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return sum(entry[2] for entry in self.history)

    @property
    def events(self) -> tuple[RoundEvent, ...] | None:
        """(server round, steps) of every trained round in order; None for a legacy record."""
        if self.round_steps is None:
            return None
        return tuple(zip(self.rounds, self.round_steps, strict=True))

    def accountant(self) -> IAccountant:
        """A fresh Opacus accountant holding this history (changes do not write back)."""
        from opacus.accountants import create_accountant

        acc = create_accountant(mechanism=self.mechanism)
        if self.history:
            acc.load_state_dict(
                {"history": [list(e) for e in self.history], "mechanism": self.mechanism}
            )
            acc.history = [tuple(e) for e in self.history]
        return acc

    def epsilon(self, delta: float) -> float:
        """ε spent so far at δ (0 before any step); Opacus's number, bit for bit."""
        if not self.history:
            return 0.0
        if self.mechanism == "rdp":
            return _rdp_epsilon(self.history, delta)
        return float(self.accountant().get_epsilon(delta=delta))

    def with_steps(self, noise_multiplier: float, sample_rate: float, steps: int) -> PrivacyState:
        """The state after `steps` more DP-SGD steps (Opacus's merge rule)."""
        acc = self.accountant()
        for _ in range(steps):
            acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return replace(self, history=_history_of(acc))

    def with_accountant(self, acc: IAccountant) -> PrivacyState:
        """The state holding a (stepped) accountant's history."""
        if acc.mechanism() != self.mechanism:
            raise PrivacyStateError(
                f"accountant {acc.mechanism()!r} does not match state {self.mechanism!r}"
            )
        return replace(self, history=_history_of(acc))

    def with_round(self, server_round: int, epsilon: float) -> PrivacyState:
        """Close a trained round: the steps added since the last round belong to it."""
        round_steps = None
        if self.round_steps is not None:
            round_steps = (*self.round_steps, self.steps - sum(self.round_steps))
        return replace(
            self, rounds=(*self.rounds, int(server_round)), epsilons=(*self.epsilons, epsilon),
            round_steps=round_steps,
        )

    # -- reconciliation -----------------------------------------------------------------
    def covers(self, other: PrivacyState) -> bool:
        """Whether this state accounts for every step of `other` (it is `other`, extended).

        The merged histories must agree on `other`'s steps, and `other`'s round events must
        be the first of this state's (for a legacy record without events: the history only).
        """
        if self.mechanism != other.mechanism or self.steps < other.steps:
            return False
        if None not in (self.delta, other.delta) and self.delta != other.delta:
            return False
        if _history_head(self.history, other.steps) != _merged(other.history):
            return False
        mine, theirs = self.events, other.events
        if mine is None or theirs is None:
            return True
        return mine[:len(theirs)] == theirs

    # -- serialisation ------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        """Flat dict of str/int/float and lists of them (a Flower ConfigRecord's types)."""
        record: dict[str, Any] = {
            "format": STATE_FORMAT,
            "mechanism": self.mechanism,
            "noise_multipliers": [float(e[0]) for e in self.history],
            "sample_rates": [float(e[1]) for e in self.history],
            "steps": [int(e[2]) for e in self.history],
            "rounds": [int(r) for r in self.rounds],
            "epsilons": [float(e) for e in self.epsilons],
        }
        if self.delta is not None:
            record["delta"] = float(self.delta)
        if self.noise_multiplier is not None:
            record["noise_multiplier"] = float(self.noise_multiplier)
        if self.round_steps is not None:
            record["round_steps"] = [int(n) for n in self.round_steps]
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PrivacyState:
        """Rebuild and validate; a damaged record raises instead of restarting at ε=0."""
        if record.get("format") != STATE_FORMAT:
            raise PrivacyStateError(
                f"privacy state format {record.get('format')!r} is not {STATE_FORMAT}"
            )
        sigmas = _float_list(record, "noise_multipliers")
        rates = _float_list(record, "sample_rates")
        steps = [_as_int(v, "steps") for v in _list(record, "steps")]
        if not (len(sigmas) == len(rates) == len(steps)):
            raise PrivacyStateError(
                "privacy state history lists differ in length: "
                f"{len(sigmas)} noise multipliers, {len(rates)} sample rates, {len(steps)} steps"
            )
        for sigma, rate, count in zip(sigmas, rates, steps, strict=True):
            if not (sigma > 0 and 0 < rate <= 1 and count >= 1):
                raise PrivacyStateError(
                    f"privacy state history entry (sigma={sigma}, q={rate}, steps={count}) "
                    "is invalid"
                )
        rounds = [_as_int(v, "rounds") for v in _list(record, "rounds")]
        epsilons = _float_list(record, "epsilons")
        if len(rounds) != len(epsilons):
            raise PrivacyStateError("privacy state rounds and epsilons differ in length")
        delta = _optional_float(record, "delta")
        if delta is not None and not 0 < delta < 1:
            raise PrivacyStateError(f"privacy state delta={delta} is not in (0, 1)")
        sigma0 = _optional_float(record, "noise_multiplier")
        if sigma0 is not None and not sigma0 > 0:
            raise PrivacyStateError(f"privacy state noise_multiplier={sigma0} is not > 0")
        round_steps: tuple[int, ...] | None = ()
        if "round_steps" in record:
            round_steps = tuple(_as_int(v, "round_steps") for v in _list(record, "round_steps"))
            if any(n < 1 for n in round_steps):
                raise PrivacyStateError("privacy state round_steps holds a count below 1")
            if sum(round_steps) != sum(steps):
                raise PrivacyStateError(
                    f"privacy state rounds account for {sum(round_steps)} steps, its history "
                    f"for {sum(steps)}"
                )
        elif rounds or steps:
            round_steps = None  # written before per-round steps were kept
        return cls(
            mechanism=str(record.get("mechanism")),
            history=tuple(zip(sigmas, rates, steps, strict=True)),
            delta=delta,
            noise_multiplier=sigma0,
            rounds=tuple(rounds),
            epsilons=tuple(epsilons),
            round_steps=round_steps,
        )


def combined(recorded: PrivacyState, own: PrivacyState) -> PrivacyState:
    """One state holding every trained round of both, each counted once.

    `recorded` is the copy the server's ledger holds, `own` what this client kept. If one
    covers the other it is the answer. Otherwise they diverged: `own` grew from an older
    copy (its state was lost or restored from a backup) and trained rounds the ledger never
    saw. Those rounds (`own`'s events after the longest common prefix) are appended to
    the recorded ones: they really happened, and dropping them would undercount. Without
    events on both sides (a legacy record) nothing is known to be shared, so all of `own`'s
    steps are appended: an overcount, never an undercount.
    """
    if own.covers(recorded):
        return own
    if recorded.covers(own):
        return recorded
    if own.mechanism != recorded.mechanism:
        raise PrivacyStateError(
            f"the ledger's record uses the {recorded.mechanism!r} accountant, this node's "
            f"state {own.mechanism!r}: an accountant cannot be switched mid-run"
        )
    delta = recorded.delta if recorded.delta is not None else own.delta
    if delta is None:
        raise PrivacyStateError("cannot combine privacy states that fix no delta")
    mine, theirs = own.events, recorded.events
    base = replace(recorded, delta=delta)
    if mine is None or theirs is None:
        history = _merged((*recorded.history, *own.history))
        epsilon = replace(base, history=history).epsilon(delta)
        return replace(base, history=history, rounds=(*recorded.rounds, *own.rounds),
                       epsilons=(*recorded.epsilons, *[epsilon] * len(own.rounds)),
                       round_steps=None)
    shared = 0
    while shared < min(len(mine), len(theirs)) and mine[shared] == theirs[shared]:
        shared += 1
    skip = sum(steps for _, steps in mine[:shared])
    history = _merged((*recorded.history, *_history_tail(own.history, skip)))
    state = base
    for server_round, steps in mine[shared:]:
        state = replace(state, history=_history_head(history, state.steps + steps))
        state = state.with_round(server_round, state.epsilon(delta))
    return state


@lru_cache(maxsize=256)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    # RDP composes linearly in the number of steps and Opacus computes `rdp(1 step) * steps`,
    # so caching the one-step vector per (q, sigma) changes no bit of the result while
    # turning every budget check after the first into a cheap multiply (the fractional
    # orders cost ~0.4 s per evaluation here).
    rdp = privacy_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    rdp.setflags(write=False)
    return rdp


def _rdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """What `RDPAccountant.get_epsilon(delta)` returns for `history`, same operation order."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    rdp = sum(_rdp_per_step(q, sigma) * steps for sigma, q, steps in history)
    eps, _ = privacy_analysis.get_privacy_spent(
        orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
    )
    return float(eps)


def _history_of(acc: IAccountant) -> tuple[HistoryEntry, ...]:
    return tuple((float(s), float(q), int(n)) for s, q, n in acc.history)


def _merged(entries: tuple[HistoryEntry, ...] | list[HistoryEntry]) -> tuple[HistoryEntry, ...]:
    """Consecutive entries with equal (σ, q) merged, as Opacus's `step` keeps its history."""
    out: list[HistoryEntry] = []
    for sigma, q, steps in entries:
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        elif steps > 0:
            out.append((sigma, q, steps))
    return tuple(out)


def _history_head(history: tuple[HistoryEntry, ...], steps: int) -> tuple[HistoryEntry, ...]:
    """The history of the first `steps` steps (merged form)."""
    out: list[HistoryEntry] = []
    left = steps
    for sigma, q, count in history:
        if left <= 0:
            break
        out.append((sigma, q, min(count, left)))
        left -= count
    return _merged(out)


def _history_tail(history: tuple[HistoryEntry, ...], skip: int) -> tuple[HistoryEntry, ...]:
    """The history after its first `skip` steps (merged form)."""
    out: list[HistoryEntry] = []
    for sigma, q, count in history:
        take = count - max(0, min(count, skip))
        skip = max(0, skip - count)
        if take > 0:
            out.append((sigma, q, take))
    return _merged(out)


def _list(record: Mapping[str, Any], key: str) -> list[Any]:
    value = record.get(key, [])
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise PrivacyStateError(f"privacy state {key!r} is not a list")
    return list(value)


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyStateError(f"privacy state {key!r} holds a non-number: {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise PrivacyStateError(f"privacy state {key!r} holds a non-finite number")
    return out


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PrivacyStateError(f"privacy state {key!r} holds a non-integer: {value!r}")
    return int(value)


def _float_list(record: Mapping[str, Any], key: str) -> list[float]:
    return [_as_float(v, key) for v in _list(record, key)]


def _optional_float(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    return None if value is None else _as_float(value, key)
