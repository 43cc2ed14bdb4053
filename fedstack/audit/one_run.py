"""One-run DP auditing (Steinke, Nasr, Jagielski 2023): an empirical lower bound on ε.

Why: an accountant's ε is a proof about the code as *specified*; a bug (noise not added, a
wrong σ reported, clipping skipped) leaves the number unchanged. This audit measures the
code as *run*: m canaries are each put into the training data independently with
probability 1/2, an auditor guesses from the released model (or the server's view) which
ones went in, and the number of correct guesses is turned into a lower bound on the ε the
run can satisfy. If that lower bound exceeds the accountant's ε, the accountant is wrong.

The statistics (their Theorem 3.1, and Algorithm 2 for the search): if the training
procedure is (ε, δ)-DP with respect to each canary, S is the uniform inclusion vector and
T ∈ {-1, 0, 1}^m are guesses with ‖T‖₁ ≤ r (0 = abstain), then the number W of correct
guesses satisfies, for every v,

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i=1..v} (f(v-i) - f(v)) / i,
    f(k) = P[Binomial(r, q) ≥ k],  q = e^ε / (1 + e^ε).

For δ = 0 this is the tail of the binomial of ε-DP randomized response. The right-hand
side is the p-value of "the run is (ε, δ)-DP" after observing v correct guesses; the bound
is the largest ε rejected at level β (the p-value grows with ε, so it is found by
bisection). The guess sizes (how many top/bottom scores to guess) may be chosen among a
few candidates after seeing the scores only with a Bonferroni correction (β / candidates),
which this module applies, so the bound holds with confidence 1 - β as stated.

Pure NumPy/SciPy; nothing here knows about Flower or torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

#: Default β: the bound holds with probability at least 1 - β (95% confidence).
DEFAULT_BETA = 0.05
#: Candidate guess sizes as fractions of m: (share guessed "in", share guessed "out").
#: Few candidates, because each one costs the Bonferroni correction a factor. "In"-only
#: guesses matter: an included canary that Poisson sampling never drew looks exactly like
#: an excluded one (a share e^-(epochs) of them), which spoils the lowest scores.
DEFAULT_GUESS_FRACTIONS: tuple[tuple[float, float], ...] = (
    (0.1, 0.0), (0.2, 0.0), (0.3, 0.0), (0.4, 0.0),
    (0.05, 0.05), (0.1, 0.1), (0.2, 0.2), (0.3, 0.3),
)
#: Bisection stops when the ε bracket is this narrow.
EPSILON_TOLERANCE = 1e-6
#: Upper end of the ε search. An ε this large already makes q = 1 - 2e-22, so no finite
#: number of guesses can reject it.
EPSILON_SEARCH_MAX = 50.0


def correct_guess_rate(epsilon: float) -> float:
    """q = e^ε / (1 + e^ε): the accuracy of ε-DP randomized response (1/2 at ε = 0)."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Bound on P[at least v of r guesses correct] for an (ε, δ)-DP run with m canaries.

    Theorem 3.1 of Steinke, Nasr, Jagielski (2023); see the module docstring.
    """
    _check_counts(m, r, v)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = correct_guess_rate(epsilon)
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= B < v] = sum_{j=1..i} pmf(v - j), for i = 1..v.
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = DEFAULT_BETA) -> float:
    """The largest ε that v correct guesses out of r reject at level β (0: none rejected).

    With probability at least 1 - β over the canaries' inclusion and the training
    randomness, a run that is (ε, δ)-DP yields a bound ≤ ε.
    """
    _check_counts(m, r, v)
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, EPSILON_SEARCH_MAX  # invariant: p(low) < beta <= p(high)
    if p_value(m, r, v, high, delta) < beta:  # pragma: no cover - needs astronomically many guesses
        return high
    while high - low > EPSILON_TOLERANCE:
        mid = 0.5 * (low + high)
        if p_value(m, r, v, mid, delta) < beta:
            low = mid
        else:
            high = mid
    return low


def guesses_from_scores(scores: Sequence[float] | np.ndarray, k_in: int, k_out: int) -> np.ndarray:
    """+1 ("included") for the k_in highest scores, -1 for the k_out lowest, 0 otherwise.

    A higher score must mean "more likely included" (e.g. minus the canary's loss). Ties
    are broken by position, which depends on nothing secret.
    """
    values = np.asarray(scores, dtype=np.float64)
    m = len(values)
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"cannot make {k_in} + {k_out} guesses about {m} canaries")
    if not np.all(np.isfinite(values)):
        raise ValueError("canary scores must be finite")
    order = np.argsort(-values, kind="stable")
    guesses = np.zeros(m, dtype=np.int8)
    guesses[order[:k_in]] = 1
    if k_out:
        guesses[order[m - k_out:]] = -1
    return guesses


def count_correct(guesses: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(r, v): guesses made (non-abstentions) and guesses that match the inclusion."""
    guesses = np.asarray(guesses)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    if guesses.shape != truth.shape:
        raise ValueError(f"{guesses.shape[0]} guesses for {truth.shape[0]} canaries")
    made = guesses != 0
    return int(made.sum()), int((guesses[made] == truth[made]).sum())


@dataclass(frozen=True)
class OneRunAudit:
    """The audit's result: the bound and everything needed to check it by hand."""

    #: Empirical lower bound on ε at `delta`, holding with confidence 1 - beta.
    epsilon_lower_bound: float
    #: Canaries (each included with probability 1/2), of which `num_included` were.
    m: int
    num_included: int
    #: Guesses made and correct guesses, for the chosen guess sizes.
    r: int
    v: int
    k_in: int
    k_out: int
    delta: float
    beta: float
    #: Guess-size candidates tried; each was tested at beta / candidates (Bonferroni).
    candidates: int
    #: What the scores came from (e.g. "final-model loss", "server view: update").
    score_source: str = "final-model loss"
    #: (k_in, k_out, r, v, bound at beta / candidates) of every candidate.
    trials: tuple[tuple[int, int, int, int, float], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["trials"] = [list(t) for t in self.trials]
        return record


def audit_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    beta: float = DEFAULT_BETA,
    guess_fractions: Sequence[tuple[float, float]] = DEFAULT_GUESS_FRACTIONS,
    score_source: str = "final-model loss",
) -> OneRunAudit:
    """Guess from `scores` (higher: more likely included) and bound ε from the guesses.

    Every candidate guess size is tested at β / len(guess_fractions), and the largest
    bound is reported: a union bound, so the reported bound holds with confidence 1 - β.
    `included` is the audit secret; the guesses never see it, only the count of correct
    ones does.
    """
    values = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    m = len(values)
    if m == 0 or truth.shape != (m,):
        raise ValueError(f"need one inclusion bit per canary: {m} scores, {truth.shape} bits")
    if not guess_fractions:
        raise ValueError("guess_fractions must name at least one candidate")
    level = beta / len(guess_fractions)
    trials = []
    for frac_in, frac_out in guess_fractions:
        k_in, k_out = int(round(frac_in * m)), int(round(frac_out * m))
        if k_in + k_out > m or k_in + k_out == 0:
            raise ValueError(f"guess fractions ({frac_in}, {frac_out}) do not fit m={m}")
        r, v = count_correct(guesses_from_scores(values, k_in, k_out), truth)
        trials.append((k_in, k_out, r, v, epsilon_lower_bound(m, r, v, delta, level)))
    best = max(trials, key=lambda t: t[4])
    return OneRunAudit(
        epsilon_lower_bound=best[4], m=m, num_included=int(truth.sum()), r=best[2], v=best[3],
        k_in=best[0], k_out=best[1], delta=float(delta), beta=float(beta),
        candidates=len(guess_fractions), score_source=score_source, trials=tuple(trials),
    )


def epsilon_ceiling(m: int, delta: float, beta: float = DEFAULT_BETA,
                    guess_fractions: Sequence[tuple[float, float]] = DEFAULT_GUESS_FRACTIONS
                    ) -> float:
    """The largest bound `audit_scores` can report for m canaries at δ: every guess of the
    largest candidate right. Why: with 2mδ near β the δ term swamps the test (m = 400 at
    δ = 0.02 can show nothing at all); a claim above the ceiling cannot fail the audit."""
    level = beta / len(guess_fractions)
    sizes = {int(round(fi * m)) + int(round(fo * m)) for fi, fo in guess_fractions}
    return max(epsilon_lower_bound(m, r, r, delta, level) for r in sizes if 0 < r <= m)


@dataclass(frozen=True)
class AuditVerdict:
    """Whether the run's claimed ε survives the audit; `passed=False` must fail loudly."""

    passed: bool
    epsilon_lower_bound: float
    claimed_epsilon: float | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def verdict(audit: OneRunAudit, claimed_epsilon: float | None,
            claim_label: str = "the accountant's epsilon") -> AuditVerdict:
    """Compare the empirical bound with the accountant's ε (None: no DP claimed).

    A bound above the claim is a contradiction with confidence 1 - β: the run is not
    (claimed ε, δ)-DP, so the accounting or the mechanism is broken. Without a claim there
    is nothing to contradict; the bound is reported as a measurement. `claim_label` names
    the claim in the message (e.g. the record-level ε a client-level accountant implies).
    """
    bound = audit.epsilon_lower_bound
    where = (f"{audit.v} of {audit.r} guesses correct on m={audit.m} canaries, "
             f"{audit.score_source}, delta={audit.delta:.3g}, confidence {1 - audit.beta:.0%}")
    if claimed_epsilon is None:
        return AuditVerdict(True, bound, None,
                            f"no DP claimed; empirical epsilon >= {bound:.3f} ({where})")
    if bound > claimed_epsilon:
        return AuditVerdict(
            False, bound, float(claimed_epsilon),
            f"AUDIT FAILED: empirical epsilon lower bound {bound:.3f} exceeds {claim_label} "
            f"{claimed_epsilon:.3f} ({where}): the run is not as private as reported",
        )
    return AuditVerdict(
        True, bound, float(claimed_epsilon),
        f"audit passed: empirical epsilon lower bound {bound:.3f} <= {claim_label} "
        f"{claimed_epsilon:.3f} ({where})",
    )


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")


# --------------------------------------------------------------------------- a run's claim
#: δ at which a run without DP is audited (it claims nothing; the bound is a measurement).
NO_DP_DELTA = 1e-5
#: δ at most at which a client-level claim is audited. The client-level accountant's δ is
#: 1/(10·num_clients) by default (0.02 for 5 clients), where 2mδ > 1 for any useful m and the
#: bound is 0 by construction; its record recomputes ε at any δ, so the audit uses this one.
CLIENT_LEVEL_AUDIT_DELTA = NO_DP_DELTA
#: Units a DP guarantee protects (as privacy.json's `guarantee.unit` states them).
UNIT_RECORD, UNIT_CLIENT = "record", "client"
#: DP layers whose accountant is client-level (privacy.json `client_level`).
CLIENT_LEVEL_LAYERS = ("central", "distributed")
#: DP layers whose guarantee does not cover what the server receives: under dp=central the
#: server is trusted and sees every client's update in the clear, before clipping and noise.
SERVER_TRUSTED_LAYERS = ("central",)
#: What a canary is, whatever the layer: the bound is about one record's inclusion.
CANARY_UNIT_NOTE = ("canaries are records inside clients' data: the bound is a record-level "
                    "lower bound, valid against a record-level claim and against a "
                    "client-level one converted to one record (replacing that client's "
                    "data: twice the sensitivity)")


@dataclass(frozen=True)
class PrivacyClaim:
    """What the run's accountant claims, and the ε that claim implies for one canary.

    A canary is one record of one client, and its inclusion is what the audit tests. Under
    dp=local the accountant's per-record ε is exactly that. Under dp=central/distributed the
    accountant's ε is about adding or removing a whole client; including a record in a
    client that takes part either way *replaces* that client's data, which the add/remove
    guarantee covers only via the same mechanism at twice the sensitivity (two clipped
    updates differ by up to 2C; group privacy would make δ vacuous at ε = 8). So the canary
    ε is recomputed from the record in privacy.json with doubled sensitivity and without
    amplification by client sampling (conditioned on the data-independent cohorts): a claim
    never below the client-level ε, so a bound above it is still a contradiction. Both are
    recomputed from the record at δ ≤ CLIENT_LEVEL_AUDIT_DELTA (the run is (ε(δ), δ)-DP for
    every δ its accountant evaluates), where the audit has power.
    """

    #: The run's DP layer (dp.name).
    layer: str
    #: Unit of the accountant's ε: "record", "client", or None (no DP).
    unit: str | None
    #: The accountant's ε in its own unit (None: no DP claimed), and its δ.
    epsilon: float | None
    delta: float
    #: Where `epsilon` was read.
    source: str
    #: ε the run satisfies for the inclusion of one canary at `delta` (the verdict's bar).
    canary_epsilon: float | None
    #: How `canary_epsilon` follows from `epsilon`.
    canary_basis: str
    #: Whether the guarantee covers what the server received (False: trusted server).
    covers_server_view: bool
    #: The accountant's ε and δ as the run reported them, where the audit recomputed the
    #: claim at a smaller δ (client level: `CLIENT_LEVEL_AUDIT_DELTA`); else None.
    run_epsilon: float | None = None
    run_delta: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def claim_of_run(run_dir: Any, layer: str, holders: Sequence[int]) -> PrivacyClaim:
    """The run's DP claim for the canaries held by `holders` (ValueError: a DP layer whose
    accounting is missing from the run directory, which an audit must not read as "no DP").

    dp=local: the accountant's ε for the holders (max over them, `summary.json`
    `epsilon_per_client`, else `epsilon_max`) at `delta_max`: each canary is one record of
    one holder and everything released is post-processing of every client's DP-SGD.
    dp=central/distributed: the client-level record (privacy.json `client_level`), see
    `PrivacyClaim`. No DP: nothing claimed, audited at NO_DP_DELTA.
    """
    import json
    from pathlib import Path

    run_dir = Path(run_dir)
    if layer in CLIENT_LEVEL_LAYERS:
        return _client_level_claim(run_dir, layer)
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    per_client = summary.get("epsilon_per_client") or {}
    mine = [per_client[str(h)] for h in set(holders) if per_client.get(str(h)) is not None]
    delta = float(summary.get("delta_max") or NO_DP_DELTA)
    if mine:
        epsilon, source = float(max(mine)), "summary.json epsilon_per_client of holders"
    elif summary.get("epsilon_max") is not None:
        epsilon, source = float(summary["epsilon_max"]), "summary.json epsilon_max"
    elif layer == "local":
        raise ValueError(f"dp=local run without accounting: {path} has no epsilon_per_client"
                         " or epsilon_max")
    else:
        return PrivacyClaim(layer, None, None, NO_DP_DELTA, "no DP accounted", None,
                            "no DP claimed: the bound is a measurement", True)
    return PrivacyClaim(layer, UNIT_RECORD, epsilon, delta, source, epsilon,
                        "record-level accountant: a canary is one record", True)


def _client_level_claim(run_dir: Any, layer: str) -> PrivacyClaim:
    import json

    import fedstack.privacy.distributed.ledger_record  # noqa: F401  (registers "skellam")
    from fedstack.privacy.client_accountant import ClientLevelRecord
    from fedstack.privacy.ledger import CLIENT_LEVEL_KEY, LEDGER_FILE

    path = run_dir / LEDGER_FILE
    raw = json.loads(path.read_text()).get(CLIENT_LEVEL_KEY) if path.is_file() else None
    if not raw:
        raise ValueError(f"dp={layer} run without its client-level accounting: {path} has no "
                         f"{CLIENT_LEVEL_KEY!r} record")
    record = ClientLevelRecord.from_json(raw)
    audited = replace(record, delta=min(record.delta, CLIENT_LEVEL_AUDIT_DELTA))
    canary, basis = replacement_epsilon(audited)
    rounds = len(record.rounds)
    return PrivacyClaim(layer, UNIT_CLIENT, audited.compute_epsilon() if rounds else 0.0,
                        audited.delta, f"{LEDGER_FILE} {CLIENT_LEVEL_KEY} ({record.mechanism}, "
                        f"{rounds} rounds; reported epsilon={record.epsilon:.3f} at delta="
                        f"{record.delta:.3g}, recomputed at delta={audited.delta:.3g})",
                        canary, basis, layer not in SERVER_TRUSTED_LAYERS,
                        run_epsilon=record.epsilon, run_delta=record.delta)


def replacement_epsilon(record: Any) -> tuple[float, str]:
    """(ε for replacing one client's data, how): the record's mechanism over its rounds at
    twice the add/remove sensitivity, every round counted for every client (q = 1)."""
    rounds = len(record.rounds)
    if rounds == 0:
        return 0.0, "no round released"
    if record.mechanism == "gaussian":
        from fedstack.privacy.client_accountant import client_level_epsilon

        return (client_level_epsilon(record.noise_multiplier / 2.0, 1.0, rounds, record.delta,
                                     record.accountant),
                f"Gaussian, sensitivity 2C (sigma {record.noise_multiplier:.4g} -> "
                f"{record.noise_multiplier / 2:.4g}), q=1, {rounds} rounds")
    if record.mechanism == "skellam":
        from fedstack.privacy.distributed.accountant import SkellamRelease, epsilon
        from fedstack.privacy.distributed.ledger_record import release_of

        one = release_of(record, rounds)
        doubled = SkellamRelease(one.variance, 2.0 * one.l2_sensitivity,
                                 2.0 * one.l1_sensitivity, rounds)
        return (epsilon([doubled], record.delta),
                f"Skellam, sensitivities 2x (L2 {2 * one.l2_sensitivity:.4g}, L1 "
                f"{2 * one.l1_sensitivity:.4g}), {rounds} rounds")
    raise ValueError(f"client-level mechanism {record.mechanism!r}: no record-level claim "
                     "for the one-run audit (add it to replacement_epsilon)")


def _scored(scores: np.ndarray, included: np.ndarray, claim: PrivacyClaim, source: str,
            *, server_view: bool = False) -> dict[str, Any]:
    """One section: the bound from `scores`, judged against the claim where it applies."""
    audit = audit_scores(scores, included, delta=claim.delta, score_source=source)
    covered = claim.canary_epsilon is not None and (claim.covers_server_view or not server_view)
    if claim.canary_epsilon is not None and not covered:
        result = AuditVerdict(
            True, audit.epsilon_lower_bound, None,
            f"not covered by the dp={claim.layer} guarantee (the server is trusted: it "
            f"receives each update before clipping and noise), so measured, not compared: "
            f"empirical epsilon >= {audit.epsilon_lower_bound:.3f} ({audit.v} of {audit.r} "
            f"guesses correct on m={audit.m} canaries, {source}, delta={audit.delta:.3g})")
    elif claim.unit == UNIT_CLIENT:
        result = verdict(audit, claim.canary_epsilon,
                         f"the record-level bar (client-level epsilon {claim.epsilon:.3f} at "
                         "twice the sensitivity)")
    else:
        result = verdict(audit, claim.canary_epsilon)
    ceiling = epsilon_ceiling(audit.m, audit.delta, audit.beta)
    return {"applicable": True, **audit.to_json(), "epsilon_ceiling": ceiling,
            "covered_by_claim": covered, "passed": result.passed,
            "message": f"{result.message}; the most {audit.m} canaries can show at this "
                       f"delta: {ceiling:.3f}"}


def server_view_scores(run_dir: Any, cfg: Any, holders: np.ndarray, inputs: np.ndarray,
                       labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, str] | str:
    """(canary indices, scores, what was attacked) from the recorded round, or why not.

    Score of a canary: minus its loss under what the server received from its holder
    (fedavg, dp=local: the client's new weights; secagg: the unmasked aggregate). Measured
    on digits and synthetic images, this separated better than the loss *drop* against the
    round's global model (subtracting the starting loss adds that loss's spread between
    canaries to both groups). Only canaries whose holder is in a target are scored (the
    server's sampling does not depend on the inclusion bits, so the subset is fair).
    """
    from fedstack.audit.membership import example_losses, load_weights, run_model
    from fedstack.audit.targets import inversion_targets
    from fedstack.outputs.server_view import ServerView

    try:
        view = ServerView.of_run(run_dir)
    except FileNotFoundError as exc:
        return str(exc)
    targets, why = inversion_targets(view)
    if not targets:
        return why or "nothing in the clear in the recorded round"
    index, scores = [], []
    for target in targets:
        after = load_weights(run_model(cfg), target.observed)
        mine = np.flatnonzero(np.isin(holders, target.partitions))
        if len(mine):
            index.append(mine)
            scores.append(-example_losses(after, inputs[mine], labels[mine]))
    if not index:
        return "no canary holder took part in the recorded round"
    kinds = sorted({t.kind for t in targets})
    return (np.concatenate(index), np.concatenate(scores),
            f"server view, round {view.round}: loss under the {' / '.join(kinds)}")


def audit_one_run(run_dir: Any, cfg: Any) -> dict[str, Any]:
    """`fedstack audit`'s one-run section: the bound from the final model and, when a round
    was recorded, from the server's view; `passed` is False when any bound exceeds the ε the
    run claims for one canary (the CLI then exits non-zero).

    The claim follows the run's DP layer (`claim_of_run`): record-level under dp=local,
    client-level under dp=central/distributed (the result says which: `claim_unit`; the
    canaries are records either way: `canary_unit`). Under dp=central the server's view is
    not covered by the guarantee (trusted server): that bound is reported, not compared.
    Under dp=distributed the server's view is the noisy sum, covered like the model."""
    from pathlib import Path

    from fedstack.audit.canaries import CANARY_FILE, canaries_of_run, load_plan
    from fedstack.audit.membership import example_losses, final_model

    run_dir = Path(run_dir)
    if not (run_dir / CANARY_FILE).is_file():
        return {"applicable": False, "reason": f"the run inserted no canaries (no {CANARY_FILE}"
                "; run with audit.canaries=m)"}
    plan = load_plan(run_dir)
    canaries = canaries_of_run(cfg, plan)
    included = plan.included
    layer = str(cfg.dp.name)
    try:
        claim = claim_of_run(run_dir, layer, plan.holders)
    except ValueError as exc:
        return {"applicable": False, "reason": str(exc)}
    sections: dict[str, Any] = {}
    model, why = final_model(run_dir, cfg)
    if model is None:
        sections["final_model"] = {"applicable": False, "reason": why}
    else:
        scores = -example_losses(model, canaries.inputs, canaries.labels)
        sections["final_model"] = _scored(scores, included, claim, "final-model loss")
    viewed = server_view_scores(run_dir, cfg, np.asarray(plan.holders), canaries.inputs,
                                canaries.labels)
    if isinstance(viewed, str):
        sections["server_view"] = {"applicable": False, "reason": viewed}
    else:
        index, scores, source = viewed
        sections["server_view"] = _scored(scores, included[index], claim, source,
                                          server_view=True)
    ran = [s for s in sections.values() if s.get("applicable")]
    claimed = claim.epsilon
    lines = [f"- {plan.m} {plan.kind} canaries held by clients {sorted(set(plan.holders))}, "
             f"{int(included.sum())} included (the secret: {CANARY_FILE}); accountant "
             f"(dp={layer}, unit: {claim.unit or 'none'}): epsilon="
             f"{claimed if claimed is None else round(claimed, 3)} at delta={claim.delta:.3g} "
             f"({claim.source})"]
    if claim.unit == UNIT_CLIENT:
        lines.append(f"- {CANARY_UNIT_NOTE}; the bar for one record is epsilon="
                     f"{claim.canary_epsilon:.3f} ({claim.canary_basis})")
    for name, section in sections.items():
        lines.append(f"- {name}: " + (section["message"] if section.get("applicable")
                                      else f"not applicable: {section['reason']}"))
    return {"applicable": bool(ran), "passed": all(s["passed"] for s in ran),
            "claimed_epsilon": claimed, "delta": claim.delta, "claim_source": claim.source,
            "claim_unit": claim.unit, "canary_unit": UNIT_RECORD,
            "canary_epsilon": claim.canary_epsilon, "claim": claim.to_json(),
            "canaries_test": CANARY_UNIT_NOTE, "m": plan.m,
            "num_included": int(included.sum()), "kind": plan.kind, **sections,
            "summary_lines": lines}
