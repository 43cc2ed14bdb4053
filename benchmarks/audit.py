"""What an attacker at the server achieves, per stack: `fedstack audit` on real runs.

For each task (digits, breast_cancer) and stack (fedavg, secagg, he, dp=local at two ε), a
run goes through the real ServerApp body and ClientApp (in process: tests/inprocess_grid, no
Ray) with audit mode on (the last round's server view is recorded), then `fedstack.audit`
attacks it exactly as the CLI does: update inversion on the recorded view (Geiping et al.
2020), membership inference on the final model (loss threshold and offline LiRA) and the
one-run DP audit when the run carries canaries.

The setting is the inversion attack's best case, stated so nobody mistakes it for typical:
clients keep 90% of their share for validation, so each trains on a handful of examples in
one full-batch SGD step per round (the update is then a gradient); 5 clients per round.
Everything else is the task's default (digits: the small CNN, ~10k parameters, to keep
CPU time in minutes). Membership inference and the one-run audit attack the final model of a
separate run per stack with the task's own training settings (5 clients, full shares).
Sample sizes: reconstructions are pooled over `--seeds` runs (each a
different data split, client sampling and attack initialisation); their 95% intervals
(Wilson) treat reconstructions as independent, which those of one batch are not.

Writes benchmarks/results/audit.json: `stacks` -> stack -> task -> results, plus the README
rows. Usage: python benchmarks/audit.py [--quick] [--seeds N] [--tasks digits,breast_cancer]
[--stacks fedavg,secagg,he,dp_local_eps8,dp_local_eps1] [--canaries M]
About 10-15 min on 2 busy cores by default (take the heavy lock); --quick ~2 min.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedstack.audit.intervals import mean_interval, wilson_interval  # noqa: E402
from fedstack.audit.inversion import InversionSettings  # noqa: E402

RESULT_FILE = ROOT / "benchmarks" / "results" / "audit.json"
#: The two ε of the dp=local rows (per client, over the planned rounds).
EPSILONS = (8.0, 1.0)
STACKS: dict[str, list[str]] = {
    "fedavg": ["aggregation=fedavg"],
    "secagg": ["aggregation=secagg"],
    "he": ["aggregation=he"],
    **{f"dp_local_eps{e:g}": ["dp=local", f"dp.target_epsilon={e}"] for e in EPSILONS},
}
#: Per task: enough clients that 5 per round each train on a handful of examples.
TASKS: dict[str, list[str]] = {
    "digits": ["task=digits", "task.model=digits_cnn_small", "num_clients=40",
               "fraction_train=0.125"],
    "breast_cancer": ["task=breast_cancer", "num_clients=20", "fraction_train=0.25"],
}
COMMON = ["partition=iid", "task.client_val_fraction=0.9", "task.batch_size=64",
          "task.local_epochs=1", "min_train_nodes=5", "fraction_evaluate=0",
          "min_evaluate_nodes=0", "log_table=false", "log_level=warning"]
#: The membership runs: the task's own training settings (5 clients, each with its full
#: share), so the final model is trained the way a user would train it.
MEMBERSHIP_TASKS: dict[str, list[str]] = {
    "digits": ["task=digits", "task.model=digits_cnn_small"],
    "breast_cancer": ["task=breast_cancer"],
}
MEMBERSHIP_COMMON = ["partition=iid", "num_clients=5", "fraction_evaluate=0",
                     "min_evaluate_nodes=0", "log_table=false", "log_level=warning"]


def run_stack(task: str, stack: str, seed: int, rounds: int, out: Path,
              canaries: int, *, membership: bool = False) -> Path:
    """One run (recorded in its last round for inversion, or trained with the task's own
    settings for the model attacks); returns its directory."""
    from fedstack.client_app import app as client_app
    from fedstack.config import compose_config
    from fedstack.server_app import run_server
    from tests.inprocess_grid import InProcessGrid

    if membership:
        overrides = [*MEMBERSHIP_COMMON, *MEMBERSHIP_TASKS[task], *STACKS[stack],
                     f"seed={seed}", f"num_rounds={rounds}", f"output_dir={out}",
                     f"run_name={task}-{stack}-{seed}-membership"]
    else:
        overrides = [*COMMON, *TASKS[task], *STACKS[stack], f"seed={seed}",
                     f"num_rounds={rounds}", f"audit.record_round={rounds}",
                     f"output_dir={out}", f"run_name={task}-{stack}-{seed}"]
    if canaries:
        overrides.append(f"audit.canaries={canaries}")
    cfg = compose_config(overrides)
    summary = run_server(InProcessGrid(client_app, int(cfg.num_clients)), cfg)
    if summary["status"] not in ("completed", "stopped"):
        raise RuntimeError(f"{task}/{stack} seed {seed}: run {summary['status']}: "
                           f"{summary.get('reason')}")
    return Path(summary["run_dir"])


def _pool_inversion(sections: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the inversion sections of several runs of one stack."""
    applicable = [s for s in sections if s.get("applicable")]
    if not applicable:
        reasons = sorted({str(s.get("reason")) for s in sections})
        out: dict[str, Any] = {"applicable": False, "reason": "; ".join(reasons)}
        he = [s["he_decryption"] for s in sections if "he_decryption" in s]
        if he:
            out["he_decryption_refused"] = sum(h["decryption_refused"] for h in he)
            out["he_decryption_attempts"] = sum(h["replies"] for h in he)
        return out
    matched = sum(s["matched"] for s in applicable)
    trials = sum(s["reconstructions"] for s in applicable)
    pooled: dict[str, Any] = {
        "applicable": True, "runs": len(applicable), "reconstructions": trials,
        "matched": matched, "match_share": matched / trials if trials else None,
        "match_share_ci95": list(wilson_interval(matched, trials)),
        "targets": sum(len(s["targets"]) for s in applicable),
        "examples_per_target": sorted({t["batch_observed"] for s in applicable
                                       for t in s["targets"]}),
        "labels_right_mean": _mean([t["labels_right"] for s in applicable
                                    for t in s["targets"] if t["labels_right"] is not None]),
        "match_rule": applicable[0]["match_rule"],
    }
    aggregates = [t["any_client"] for s in applicable for t in s["targets"] if "any_client" in t]
    if aggregates:
        # An aggregate's reconstructions scored against every participant's data at once:
        # recovering the cohort's examples without knowing whose they are.
        hit = sum(a["matched"] for a in aggregates)
        total = sum(a["reconstructions"] for a in aggregates)
        pooled.update({"any_participant_matched": hit, "any_participant_reconstructions": total,
                       "any_participant_share": hit / total if total else None,
                       "any_participant_share_ci95": list(wilson_interval(hit, total))})
    for metric, key in (("psnr", "psnr"), ("ssim", "ssim"), ("correlation", "correlations")):
        values = [v for s in applicable for t in s["targets"]
                  for c in t["per_client"].values() for v in (c.get(key) or [])]
        stats = mean_interval(values)
        pooled[f"{metric}_mean"] = None if stats is None else stats[0]
        pooled[f"{metric}_ci95"] = None if stats is None else [stats[1], stats[2]]
    return pooled


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _membership_summary(sections: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run membership results (helper G's module) and the mean AUC per attack."""
    runs = [s for s in sections if s.get("applicable")]
    if not runs:
        return {"applicable": False,
                "reason": "; ".join(sorted({str(s.get("reason")) for s in sections}))}
    out: dict[str, Any] = {"applicable": True, "runs": len(runs),
                           "members_per_run": [r.get("num_members") for r in runs],
                           "per_run": [r.get("attacks") for r in runs]}
    attacks = sorted({a for r in runs for a in (r.get("attacks") or {})})
    for attack in attacks:
        aucs = [r["attacks"][attack].get("auc") for r in runs
                if attack in (r.get("attacks") or {})]
        out[f"{attack}_auc_mean"] = _mean([a for a in aucs if a is not None])
    return out


def audit_stack(task: str, stack: str, seeds: list[int], rounds: int, settings:
                InversionSettings, out: Path, canaries: int, membership: bool
                ) -> dict[str, Any]:
    from fedstack.audit.runner import audit_run

    sections: dict[str, list[dict[str, Any]]] = {"inversion": [], "membership": [],
                                                 "one_run": []}
    accuracies, seconds = [], []
    for seed in seeds:
        started = time.perf_counter()
        run_dir = run_stack(task, stack, seed, rounds, out, canaries)
        audit = audit_run(run_dir, inversion_settings=replace(settings, seed=seed),
                          model_attacks=False)
        seconds.append(time.perf_counter() - started)
        summary = json.loads((run_dir / "summary.json").read_text())
        accuracies.append(summary.get("final_accuracy"))
        sections["inversion"].append(audit["inversion"])
    result: dict[str, Any] = {
        "seeds": seeds, "rounds": rounds, "final_accuracy": accuracies,
        "seconds_per_run": [round(s, 1) for s in seconds],
        "inversion": _pool_inversion(sections["inversion"]),
    }
    if membership:  # one run with the task's own training settings, first seed
        started = time.perf_counter()
        run_dir = run_stack(task, stack, seeds[0], rounds, out, canaries, membership=True)
        audit = audit_run(run_dir, model_attacks=True)
        summary = json.loads((run_dir / "summary.json").read_text())
        result["membership_run"] = {
            "setting": [*MEMBERSHIP_COMMON, *MEMBERSHIP_TASKS[task], *STACKS[stack]],
            "seed": seeds[0], "final_accuracy": summary.get("final_accuracy"),
            "seconds": round(time.perf_counter() - started, 1)}
        for key in ("membership", "one_run"):
            if isinstance(audit.get(key), dict):
                result[key] = (_membership_summary([audit[key]]) if key == "membership"
                               else audit[key])
    return result


def readme_rows(stacks: dict[str, Any]) -> list[str]:
    """Rows of the README table "what an attacker at the server achieves"."""
    rows = ["| stack | task | inversion: reconstructions matching a training example "
            "(95% CI) | mean SSIM (images) | mean correlation with nearest example | "
            "membership AUC (per attack) |",
            "|---|---|---|---|---|---|"]
    for stack, tasks in stacks.items():
        for task, r in tasks.items():
            inv = r["inversion"]
            if inv.get("applicable"):
                lo, hi = inv["match_share_ci95"]
                share = (f"{inv['matched']}/{inv['reconstructions']} = "
                         f"{inv['match_share']:.0%} ({lo:.0%}–{hi:.0%})")
                if inv.get("any_participant_reconstructions"):
                    alo, ahi = inv["any_participant_share_ci95"]
                    share += (f"; some participant's: {inv['any_participant_matched']}/"
                              f"{inv['any_participant_reconstructions']} = "
                              f"{inv['any_participant_share']:.0%} ({alo:.0%}–{ahi:.0%})")
                ssim = "–" if inv.get("ssim_mean") is None else f"{inv['ssim_mean']:.2f}"
                corr = f"{inv['correlation_mean']:.2f}"
            elif "he_decryption_attempts" in inv:
                share = (f"n/a: ciphertexts only (decryption with the server's context "
                         f"refused {inv['he_decryption_refused']}/"
                         f"{inv['he_decryption_attempts']})")
                ssim = corr = "–"
            else:
                share, ssim, corr = f"n/a: {inv.get('reason')}", "–", "–"
            mem = r.get("membership") or {}
            auc = "–"
            if mem.get("applicable"):
                auc = ", ".join(f"{k[:-len('_auc_mean')]} {mem[k]:.2f}" for k in sorted(mem)
                                if k.endswith("_auc_mean") and mem[k] is not None)
            elif mem and stack == "he":
                auc = "n/a: the server holds no plaintext model"
            elif mem:
                auc = f"n/a ({mem.get('reason')})"
            rows.append(f"| {stack} | {task} | {share} | {ssim} | {corr} | {auc} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one seed, 3 rounds, 100 attack iterations, no model attacks")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--canaries", type=int, default=0,
                        help="canaries per run for the one-run DP audit (0: none)")
    parser.add_argument("--no-model-attacks", action="store_true")
    parser.add_argument("--merge", action="store_true",
                        help="update only the stacks run here in an existing result file")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result file (default {RESULT_FILE.relative_to(ROOT)}; --quick "
                             "writes none unless given)")
    args = parser.parse_args()
    seeds = [0] if args.quick else list(range(args.seeds))
    rounds = 3 if args.quick else args.rounds
    settings = InversionSettings(iterations=100 if args.quick else 300, restarts=1 if
                                 args.quick else 2)
    membership = not (args.quick or args.no_model_attacks)
    tasks, stacks = args.tasks.split(","), args.stacks.split(",")
    unknown = [s for s in stacks if s not in STACKS] + [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown stack/task {unknown}; stacks: {list(STACKS)}, tasks: "
                     f"{list(TASKS)}")
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedstack-audit-bench-") as tmp:
        for stack in stacks:
            for task in tasks:
                t0 = time.perf_counter()
                r = audit_stack(task, stack, seeds, rounds, settings, Path(tmp),
                                args.canaries, membership)
                results.setdefault(stack, {})[task] = r
                inv = r["inversion"]
                print(f"{stack:>14} {task:>13}: " + (
                    f"inversion {inv['matched']}/{inv['reconstructions']} "
                    f"({inv['match_share']:.0%}), SSIM {inv.get('ssim_mean')}"
                    if inv.get("applicable") else f"inversion n/a ({inv.get('reason')})")
                    + f" [{time.perf_counter() - t0:.0f} s]", flush=True)
    out = args.out or (None if args.quick else RESULT_FILE)
    if args.merge and out is not None and out.is_file():
        previous = json.loads(out.read_text())
        for stack, by_task in results.items():
            previous["stacks"].setdefault(stack, {}).update(by_task)
        results = {k: previous["stacks"][k] for k in [*STACKS, *previous["stacks"]]
                   if k in previous["stacks"]}
    rows = readme_rows(results)
    print("\n".join(rows))
    payload = {
        "benchmark": "audit", "generated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime()),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "quick": args.quick, "seeds": seeds, "rounds": rounds,
        "setting": {"common": COMMON, "tasks": TASKS, "stacks": STACKS,
                    "recorded_round": rounds, "canaries": args.canaries},
        "inversion_settings": settings.to_json(),
        "seconds_total": round(time.time() - started, 1),
        "stacks": results,
        "readme_rows": rows,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
