"""Client-level (user-level) DP accounting of the released models: ε over the rounds.

Why a separate accountant from the per-record one (`accountant_state`): under `dp=central`
(and `dp=distributed`) the unit protected is a whole client, the noise is added once per
round to the sum of the clipped client updates, and the "sample rate" is the probability
that a client takes part in a round, not a batch's share of a client's data. One round is
one step of the (subsampled) Gaussian mechanism with noise multiplier σ = noise std /
clipping bound, so after R rounds ε is what Opacus computes for the history
[(σ, q, R)], and an auditor recomputes it from `privacy.json` with Opacus alone.

Honesty about sampling: the amplification-by-subsampling bounds (RDP of the sampled
Gaussian, PRV) hold for *Poisson* sampling, each client independently with probability q.
A run records which sampling it really did (`SAMPLING_POISSON` with q < 1, or
`SAMPLING_ALL`: every client every round, q = 1, no amplification claimed).

Other mechanisms (the discrete noise of `dp=distributed`) register an ε function by name in
`EPSILON_FUNCTIONS` (`register_mechanism`); the record type and the ledger are shared.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from fedstack.privacy.settings import ACCOUNTANTS

#: The continuous Gaussian mechanism (dp=central): ε from Opacus's accountants.
MECHANISM_GAUSSIAN = "gaussian"
#: Each client takes part in a round independently with probability q (amplification holds).
SAMPLING_POISSON = "poisson"
#: Every client is asked every round: q = 1, no amplification by sampling.
SAMPLING_ALL = "all"
SAMPLINGS = (SAMPLING_POISSON, SAMPLING_ALL)
#: Version tag of the serialised record.
RECORD_FORMAT = 1
#: Tolerance of the noise-multiplier search from a target ε (Opacus's default): the planned
#: run ends at most this much below the target.
EPSILON_TOLERANCE = 0.01
#: Unit each DP layer protects, as the ledger and the report state it.
UNIT_CLIENT = "client"

#: ε(record) per mechanism name. `gaussian` is built in; dp=distributed adds its own.
EpsilonFunction = Callable[["ClientLevelRecord"], float]
EPSILON_FUNCTIONS: dict[str, EpsilonFunction] = {}


def register_mechanism(name: str, epsilon: EpsilonFunction) -> None:
    """Let another client-level mechanism (e.g. discrete Gaussian / Skellam) be accounted."""
    EPSILON_FUNCTIONS[name] = epsilon


def check_sampling(sampling: str, sample_rate: float) -> None:
    """ValueError unless (sampling, q) is a combination the accountant may use."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"client sampling {sampling!r} is not one of {SAMPLINGS}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"client sample rate {sample_rate!r} is not in (0, 1]")
    if sampling == SAMPLING_ALL and sample_rate != 1.0:
        raise ValueError(f"sampling {SAMPLING_ALL!r} asks every client: its sample rate is 1, "
                         f"not {sample_rate!r} (amplification needs Poisson sampling)")


def client_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int,
                         delta: float, accountant: str = "rdp") -> float:
    """ε after `rounds` rounds of the Gaussian mechanism with Poisson client sampling.

    `noise_multiplier` is the std of the noise added to the sum of clipped updates in units
    of the clipping bound (the *effective* σ when adaptive clipping spends part of the
    budget on its count). q = 1 means every client every round (no amplification). This is
    Opacus's computation for the history [(σ, q, rounds)], bit for bit.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r} is not one of {ACCOUNTANTS}")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise multiplier must be > 0, got {noise_multiplier!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return _epsilon(float(noise_multiplier), float(sample_rate), int(rounds), float(delta),
                    accountant)


@lru_cache(maxsize=256)
def _epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
             accountant: str) -> float:
    # Cached: the budget check before a round and the record after it ask the same (PRV
    # takes ~0.5 s here). The per-record state type holds the same Opacus history and
    # computes ε the same way (RDP: a cached one-step vector times the steps: no bit changes).
    from fedstack.privacy.accountant_state import PrivacyState

    history = ((noise_multiplier, sample_rate, rounds),)
    with warnings.catch_warnings():
        # PRV at q = 1 takes log(1 - q) = -inf on its way to the plain Gaussian: harmless.
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        return PrivacyState(accountant, history).epsilon(delta)


def client_level_noise_multiplier(target_epsilon: float, sample_rate: float, rounds: int,
                                  delta: float, accountant: str = "rdp") -> float:
    """Smallest σ (to EPSILON_TOLERANCE) whose ε after `rounds` rounds is <= the target."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=rounds, accountant=accountant, epsilon_tolerance=EPSILON_TOLERANCE))


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """σ_Δ of the update when adaptive clipping also releases a noisy clipped count.

    Andrew et al. (2021), Thm. 1: the update (sensitivity C, noise σ_Δ·C) and the count of
    clients under the bound (each contributes b - 1/2, sensitivity 1/2, noise σ_b) together
    are one Gaussian mechanism with σ = (σ_Δ^-2 + (2σ_b)^-2)^-1/2. Solving for σ_Δ keeps the
    accounted σ: σ_Δ = (σ^-2 - (2σ_b)^-2)^-1/2, which needs 2σ_b > σ.
    """
    rest = noise_multiplier ** -2 - (2.0 * clipped_count_stddev) ** -2
    if rest <= 0:
        raise ValueError(
            f"clipped-count noise std {clipped_count_stddev!r} must exceed half the noise "
            f"multiplier {noise_multiplier!r}/2 (else the count alone spends the budget)")
    return rest ** -0.5


def effective_noise_multiplier(update_sigma: float, clipped_count_stddev: float | None) -> float:
    """The σ the accountant uses: the update's, composed with the count's if any."""
    if clipped_count_stddev is None:
        return update_sigma
    return (update_sigma ** -2 + (2.0 * clipped_count_stddev) ** -2) ** -0.5


def _gaussian_epsilon(record: ClientLevelRecord) -> float:
    return client_level_epsilon(record.noise_multiplier, record.sample_rate,
                                len(record.rounds), record.delta, record.accountant)


register_mechanism(MECHANISM_GAUSSIAN, _gaussian_epsilon)


@dataclass(frozen=True)
class ClientLevelRecord:
    """The accounting of one run's client-level DP layer, as written to privacy.json.

    One round = one step of the mechanism; every client shares this record (each is sampled
    with the same q and protected by the same noise). `history` is Opacus's form for the
    Gaussian mechanism, so `[(σ, q, R)]` recomputes ε with `RDPAccountant`/`PRVAccountant`.
    """

    mechanism: str
    accountant: str
    noise_multiplier: float
    sample_rate: float
    sampling: str
    delta: float
    #: Server rounds accounted (each one noisy release), and ε after each.
    rounds: tuple[int, ...] = ()
    epsilons: tuple[float, ...] = ()
    #: Mechanism-specific facts (clipping bound per round, update σ, count σ_b, ...).
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mechanism not in EPSILON_FUNCTIONS:
            raise ValueError(f"client-level mechanism {self.mechanism!r} is not one of "
                             f"{sorted(EPSILON_FUNCTIONS)}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant {self.accountant!r} is not one of {ACCOUNTANTS}")
        check_sampling(self.sampling, self.sample_rate)
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise multiplier {self.noise_multiplier!r} must be > 0")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta {self.delta!r} must be in (0, 1)")
        if len(self.rounds) != len(self.epsilons):
            raise ValueError("client-level record: rounds and epsilons differ in length")

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Opacus's accountant history: one entry (σ, q, rounds so far)."""
        if not self.rounds or self.mechanism != MECHANISM_GAUSSIAN:
            # Opacus's history describes a Gaussian mechanism; for discrete noise it would
            # let an auditor recompute a smaller, wrong ε.
            return []
        return [(self.noise_multiplier, self.sample_rate, len(self.rounds))]

    @property
    def epsilon(self) -> float:
        """ε after the rounds recorded (0 before any)."""
        return self.epsilons[-1] if self.epsilons else 0.0

    def compute_epsilon(self) -> float:
        """ε recomputed from the record's parameters (what an auditor does)."""
        return EPSILON_FUNCTIONS[self.mechanism](self)

    def with_round(self, server_round: int, **details: Any) -> ClientLevelRecord:
        """The record after one more noisy release; `details` extend per-round lists."""
        merged = dict(self.details)
        for key, value in details.items():
            merged[key] = [*merged.get(key, []), value]
        epsilon = self._epsilon_after(len(self.rounds) + 1)
        return replace(self, rounds=(*self.rounds, int(server_round)),
                       epsilons=(*self.epsilons, epsilon), details=merged)

    def epsilon_after_next(self) -> float:
        """ε if one more round were released (for the budget check before a round)."""
        return self._epsilon_after(len(self.rounds) + 1)

    def _epsilon_after(self, count: int) -> float:
        probe = replace(self, rounds=tuple(range(count)), epsilons=(0.0,) * count)
        return probe.compute_epsilon()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "unit": UNIT_CLIENT,
            "mechanism": self.mechanism,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "sampling": self.sampling,
            "delta": self.delta,
            "history": [list(entry) for entry in self.history],
            "rounds": list(self.rounds),
            "epsilons": list(self.epsilons),
            "epsilon": self.epsilon,
            "details": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                        for k, v in self.details.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClientLevelRecord:
        """Rebuild from privacy.json; a record whose history and rounds disagree raises."""
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"client-level record format {data.get('format')!r} is not "
                             f"{RECORD_FORMAT}")
        record = cls(
            mechanism=str(data["mechanism"]), accountant=str(data["accountant"]),
            noise_multiplier=float(data["noise_multiplier"]),
            sample_rate=float(data["sample_rate"]), sampling=str(data["sampling"]),
            delta=float(data["delta"]), rounds=tuple(int(r) for r in data.get("rounds", [])),
            epsilons=tuple(float(e) for e in data.get("epsilons", [])),
            details=dict(data.get("details") or {}))
        if [list(e) for e in record.history] != [list(e) for e in data.get("history", [])]:
            raise ValueError("client-level record: its history does not match its rounds")
        return record
