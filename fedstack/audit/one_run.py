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
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class AuditVerdict:
    """Whether the run's claimed ε survives the audit; `passed=False` must fail loudly."""

    passed: bool
    epsilon_lower_bound: float
    claimed_epsilon: float | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def verdict(audit: OneRunAudit, claimed_epsilon: float | None) -> AuditVerdict:
    """Compare the empirical bound with the accountant's ε (None: no DP claimed).

    A bound above the claim is a contradiction with confidence 1 - β: the run is not
    (claimed ε, δ)-DP, so the accounting or the mechanism is broken. Without a claim there
    is nothing to contradict; the bound is reported as a measurement.
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
            f"AUDIT FAILED: empirical epsilon lower bound {bound:.3f} exceeds the accountant's "
            f"epsilon {claimed_epsilon:.3f} ({where}): the run is not as private as reported",
        )
    return AuditVerdict(
        True, bound, float(claimed_epsilon),
        f"audit passed: empirical epsilon lower bound {bound:.3f} <= the accountant's "
        f"epsilon {claimed_epsilon:.3f} ({where})",
    )


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")


# --------------------------------------------------------------------------- a run's audit
#: δ at which a run without DP is audited (it claims nothing; the bound is a measurement).
NO_DP_DELTA = 1e-5


def claimed_privacy(run_dir: Any, holders: Sequence[int]) -> tuple[float | None, float, str]:
    """(ε the accountant reports for the canary holders, its δ, where they come from).

    Every canary is one record of one holder, and the released model is a post-processing
    of every client's DP-SGD, so the run is (max_k ε_k, max_k δ_k)-DP for each canary,
    k over the holders. Client-level DP (dp=distributed/central) implies the same record-
    level guarantee, so its ε is the claim there. No DP: (None, NO_DP_DELTA).
    """
    import json
    from pathlib import Path

    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    per_client = summary.get("epsilon_per_client") or {}
    mine = [per_client[str(h)] for h in set(holders) if per_client.get(str(h)) is not None]
    delta = summary.get("delta_max")
    if mine:
        return float(max(mine)), float(delta or NO_DP_DELTA), "epsilon_per_client of holders"
    if summary.get("epsilon_max") is not None:
        return float(summary["epsilon_max"]), float(delta or NO_DP_DELTA), "epsilon_max"
    return None, NO_DP_DELTA, "no DP accounted"


def _scored(scores: np.ndarray, included: np.ndarray, delta: float, claimed: float | None,
            source: str) -> dict[str, Any]:
    audit = audit_scores(scores, included, delta=delta, score_source=source)
    result = verdict(audit, claimed)
    return {"applicable": True, **audit.to_json(), "passed": result.passed,
            "message": result.message}


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
    was recorded, from the server's view; `passed` is False when any bound exceeds the
    accountant's ε (the CLI then exits non-zero)."""
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
    claimed, delta, claim_source = claimed_privacy(run_dir, plan.holders)
    sections: dict[str, Any] = {}
    model, why = final_model(run_dir, cfg)
    if model is None:
        sections["final_model"] = {"applicable": False, "reason": why}
    else:
        scores = -example_losses(model, canaries.inputs, canaries.labels)
        sections["final_model"] = _scored(scores, included, delta, claimed, "final-model loss")
    viewed = server_view_scores(run_dir, cfg, np.asarray(plan.holders), canaries.inputs,
                                canaries.labels)
    if isinstance(viewed, str):
        sections["server_view"] = {"applicable": False, "reason": viewed}
    else:
        index, scores, source = viewed
        sections["server_view"] = _scored(scores, included[index], delta, claimed, source)
    ran = [s for s in sections.values() if s.get("applicable")]
    lines = [f"- {plan.m} {plan.kind} canaries held by clients {sorted(set(plan.holders))}, "
             f"{int(included.sum())} included (the secret: {CANARY_FILE}); accountant: "
             f"epsilon={claimed if claimed is None else round(claimed, 3)} at delta="
             f"{delta:.3g} ({claim_source})"]
    for name, section in sections.items():
        lines.append(f"- {name}: " + (section["message"] if section.get("applicable")
                                      else f"not applicable: {section['reason']}"))
    return {"applicable": bool(ran), "passed": all(s["passed"] for s in ran),
            "claimed_epsilon": claimed, "delta": delta, "claim_source": claim_source,
            "m": plan.m, "num_included": int(included.sum()), "kind": plan.kind, **sections,
            "summary_lines": lines}
