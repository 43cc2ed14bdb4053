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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as privacy_analysis

from fedstack.privacy.settings import ACCOUNTANTS

#: Version tag of the serialised form; bump on an incompatible change.
STATE_FORMAT = 1

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


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

    def __post_init__(self) -> None:
        if self.mechanism not in ACCOUNTANTS:
            raise PrivacyStateError(
                f"accountant mechanism {self.mechanism!r} is not one of {ACCOUNTANTS}"
            )

    # -- accounting ---------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return sum(entry[2] for entry in self.history)

    def accountant(self) -> IAccountant:
        """A fresh Opacus accountant holding this history (changes do not write back)."""
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
        return replace(
            self, rounds=(*self.rounds, int(server_round)), epsilons=(*self.epsilons, epsilon)
        )

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
        return cls(
            mechanism=str(record.get("mechanism")),
            history=tuple(zip(sigmas, rates, steps, strict=True)),
            delta=delta,
            noise_multiplier=sigma0,
            rounds=tuple(rounds),
            epsilons=tuple(epsilons),
        )


@lru_cache(maxsize=256)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
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
    rdp = sum(_rdp_per_step(q, sigma) * steps for sigma, q, steps in history)
    eps, _ = privacy_analysis.get_privacy_spent(
        orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
    )
    return float(eps)


def _history_of(acc: IAccountant) -> tuple[HistoryEntry, ...]:
    return tuple((float(s), float(q), int(n)) for s, q, n in acc.history)


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
