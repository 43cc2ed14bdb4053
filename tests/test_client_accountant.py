"""The client-level accountant: ε of R rounds is Opacus's one-shot ε for [(σ, q, R)], the
record survives JSON, q = 1 claims no amplification, and adaptive clipping's split of σ
between the update and the clipped count composes back to the accounted σ."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.stats import norm

from fedstack.privacy.client_accountant import (
    MECHANISM_GAUSSIAN,
    SAMPLING_ALL,
    SAMPLING_POISSON,
    ClientLevelRecord,
    check_sampling,
    client_level_epsilon,
    client_level_noise_multiplier,
    effective_noise_multiplier,
    update_noise_multiplier,
)

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _record(accountant: str, sigma: float, q: float) -> ClientLevelRecord:
    return ClientLevelRecord(MECHANISM_GAUSSIAN, accountant, sigma, q,
                             SAMPLING_ALL if q == 1.0 else SAMPLING_POISSON, 1e-3)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_rounds_one_by_one_equal_opacus_one_shot(accountant: str) -> None:
    sigma, q, rounds = 1.1, 0.2, 3
    record = _record(accountant, sigma, q)
    for server_round in range(1, rounds + 1):
        record = record.with_round(server_round, clip_norm=1.0)
    opacus = ACCOUNTANTS[accountant]()
    opacus.history = [(sigma, q, rounds)]
    one_shot = float(opacus.get_epsilon(delta=1e-3))
    assert record.history == [(sigma, q, rounds)]
    assert record.epsilon == one_shot  # bit for bit
    assert client_level_epsilon(sigma, q, rounds, 1e-3, accountant) == one_shot
    assert list(record.epsilons) == sorted(record.epsilons)  # ε grows every round
    assert record.epsilon_after_next() > record.epsilon
    # privacy.json round trip, and an auditor's recomputation
    again = ClientLevelRecord.from_json(record.to_json())
    assert again == record and again.compute_epsilon() == one_shot


def test_a_record_whose_history_disagrees_with_its_rounds_is_refused() -> None:
    data = _record("rdp", 1.0, 0.5).with_round(1).with_round(2).to_json()
    data["history"] = [[1.0, 0.5, 5]]
    with pytest.raises(ValueError, match="history does not match"):
        ClientLevelRecord.from_json(data)


def test_no_amplification_is_claimed_without_poisson_sampling() -> None:
    with pytest.raises(ValueError, match="amplification needs Poisson"):
        check_sampling(SAMPLING_ALL, 0.5)
    with pytest.raises(ValueError, match="amplification needs Poisson"):
        ClientLevelRecord(MECHANISM_GAUSSIAN, "rdp", 1.0, 0.5, SAMPLING_ALL, 1e-3)
    # q = 1 is the plain Gaussian mechanism composed R times: a Gaussian with μ = √R/σ.
    # Its exact (ε, δ) curve (Balle & Wang 2018) must match PRV (which is tight).
    sigma, rounds, delta = 3.0, 9, 1e-3
    mu = math.sqrt(rounds) / sigma
    epsilon = client_level_epsilon(sigma, 1.0, rounds, delta, "prv")
    exact = norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)
    assert exact == pytest.approx(delta, rel=0.05)
    # Sampling (q < 1) amplifies: strictly less ε for the same σ and rounds.
    assert client_level_epsilon(sigma, 0.1, rounds, delta, "prv") < epsilon


def test_noise_from_a_target_lands_just_below_it() -> None:
    sigma = client_level_noise_multiplier(4.0, 1.0, 50, 1e-3, "rdp")
    epsilon = client_level_epsilon(sigma, 1.0, 50, 1e-3, "rdp")
    assert 4.0 - 0.011 <= epsilon <= 4.0


def test_adaptive_clipping_split_composes_back_to_the_accounted_sigma() -> None:
    sigma, count_std = 1.2, 2.0
    update_sigma = update_noise_multiplier(sigma, count_std)
    assert update_sigma > sigma  # the count takes part of the budget
    assert effective_noise_multiplier(update_sigma, count_std) == pytest.approx(sigma, rel=1e-12)
    with pytest.raises(ValueError, match="must exceed half"):
        update_noise_multiplier(sigma, sigma / 2)
