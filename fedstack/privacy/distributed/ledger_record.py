"""The client-level accountant's record of a ``dp=distributed`` run (privacy.json).

The record type is the one every client-level layer shares
(:class:`fedstack.privacy.client_accountant.ClientLevelRecord`); this module registers the
Skellam mechanism's epsilon with it. The mechanism is fixed for the run (one model size,
one plan), so the record keeps the plan's integer-unit parameters once in ``details``
(``variance``, ``l2_sensitivity``, ``l1_sensitivity``) and epsilon after R released rounds
is :func:`fedstack.privacy.distributed.accountant.epsilon` of R identical releases -- what
an auditor recomputes from privacy.json with that one function.
"""

from __future__ import annotations

from fedstack.privacy.client_accountant import (
    SAMPLING_ALL,
    ClientLevelRecord,
    register_mechanism,
)

from .accountant import SkellamRelease, epsilon
from .mechanism import SkellamPlan

#: Mechanism name in the client-level record.
MECHANISM_SKELLAM = "skellam"
#: The record's accountant field (Skellam RDP).
ACCOUNTANT = "rdp"


def release_of(record: ClientLevelRecord, count: int) -> SkellamRelease:
    """``count`` rounds of the record's mechanism as one accounting entry."""
    d = record.details
    return SkellamRelease(
        float(d["variance"]), float(d["l2_sensitivity"]), float(d["l1_sensitivity"]), count
    )


def skellam_record_epsilon(record: ClientLevelRecord) -> float:
    """Epsilon of the record's released rounds (the registered epsilon function)."""
    if not record.rounds:
        return 0.0
    return epsilon([release_of(record, len(record.rounds))], record.delta)


register_mechanism(MECHANISM_SKELLAM, skellam_record_epsilon)


def empty_record(plan: SkellamPlan, delta: float) -> ClientLevelRecord:
    """The record before any round, carrying the plan's parameters."""
    return ClientLevelRecord(
        mechanism=MECHANISM_SKELLAM,
        accountant=ACCOUNTANT,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=1.0,
        sampling=SAMPLING_ALL,
        delta=float(delta),
        details={
            "variance": plan.variance,
            "l2_sensitivity": plan.l2_sensitivity,
            "l1_sensitivity": plan.l1_sensitivity,
            "scale": plan.scale,
            "dim": plan.dim,
            "padded_dim": plan.padded_dim,
            "l2_clip": plan.settings.clip,
            "dropout_slack": plan.settings.dropout_slack,
            "noise_std": plan.noise_std,
            "effective_noise_multiplier": plan.effective_noise_multiplier,
        },
    )
