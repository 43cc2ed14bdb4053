"""`fedstack audit RUN_DIR`: run every attack that applies to a finished run.

- update inversion on the recorded server view (if the run recorded one: audit.record_round);
- membership inference and the one-run DP audit on the final model, when those modules
  provide `audit_membership(run_dir, cfg)` / `audit_one_run(run_dir, cfg)` (each returns a
  JSON-able dict; a dict with `"passed": False` is a failed audit).

Writes `audit.json` and `audit.png` into the run directory and re-renders privacy_report.md
with its audit section. Exit status: 0 when the audit ran and nothing failed, 1 when an
audit failed (e.g. an empirical ε above the accountant's), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from fedstack.audit.report import AUDIT_JSON, AUDIT_PLOT, write_audit_plot

#: Format tag of audit.json.
AUDIT_FORMAT = "fedstack-audit/1"
#: Optional attack modules: audit.json key -> "module:function(run_dir, cfg) -> dict".
MODEL_ATTACKS: dict[str, str] = {
    "membership": "fedstack.audit.membership:audit_membership",
    "one_run": "fedstack.audit.one_run:audit_one_run",
}


def _optional(path: str) -> Any:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def audit_run(run_dir: Path, *, server_round: int | None = None,
              inversion_settings: Any = None, max_targets: int | None = None,
              model_attacks: bool = True) -> dict[str, Any]:
    """Run the attacks, write audit.json, audit.png and the report; return audit.json."""
    from fedstack.audit.inversion import InversionSettings
    from fedstack.audit.inversion_audit import DEFAULT_MAX_TARGETS, audit_inversion
    from fedstack.config import config_from_yaml
    from fedstack.outputs.server_view import ServerView

    run_dir = Path(run_dir)
    cfg = config_from_yaml((run_dir / "config.yaml").read_text())
    started = time.perf_counter()
    audit: dict[str, Any] = {"format": AUDIT_FORMAT, "run_dir": str(run_dir),
                             "aggregation": str(cfg.aggregation.name), "dp": str(cfg.dp.name),
                             "task": str(cfg.task.name)}
    try:
        view = ServerView.of_run(run_dir, server_round)
    except FileNotFoundError as exc:
        audit["inversion"] = {"applicable": False, "reason": str(exc)}
    else:
        audit["inversion"] = audit_inversion(
            view, cfg, run_dir, settings=inversion_settings or InversionSettings(),
            max_targets=max_targets or DEFAULT_MAX_TARGETS)
    if model_attacks:
        for key, path in MODEL_ATTACKS.items():
            attack = _optional(path)
            audit[key] = (attack(run_dir, cfg) if attack is not None
                          else {"applicable": False, "reason": f"{path} is not available"})
    audit["failed"] = sorted(k for k, v in audit.items()
                             if isinstance(v, dict) and v.get("passed") is False)
    audit["seconds"] = round(time.perf_counter() - started, 2)
    tmp = run_dir / (AUDIT_JSON + ".tmp")
    tmp.write_text(json.dumps(audit, indent=2, default=_jsonable))
    os.replace(tmp, run_dir / AUDIT_JSON)
    write_audit_plot(audit, run_dir / AUDIT_PLOT)
    _rewrite_privacy_report(run_dir)
    return audit


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays in attack results."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _rewrite_privacy_report(run_dir: Path) -> None:
    """Re-render privacy_report.md from privacy.json (it then carries the audit section)."""
    from fedstack.privacy.ledger import LEDGER_FILE, REPORT_FILE, PrivacyLedger
    from fedstack.privacy.report import write_report

    if (run_dir / LEDGER_FILE).is_file():
        write_report(PrivacyLedger.load(run_dir), run_dir / REPORT_FILE)


def audit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstack audit",
        description="Attack a finished run the way its server (and anyone holding the final "
                    "model) could: update inversion on the recorded server view "
                    "(audit.record_round), membership inference and the one-run DP audit.")
    parser.add_argument("run_dir", type=Path, help="the run directory")
    parser.add_argument("--round", type=int, default=None, dest="server_round",
                        help="the recorded round to attack (default: the one recorded)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="inversion: optimiser steps per restart (default 300)")
    parser.add_argument("--restarts", type=int, default=None,
                        help="inversion: restarts per target (default 2)")
    parser.add_argument("--max-targets", type=int, default=None,
                        help="inversion: targets attacked at most (default 5)")
    parser.add_argument("--no-model-attacks", action="store_true",
                        help="skip membership inference and the one-run audit")
    return parser


def audit_main(argv: list[str]) -> int:
    from dataclasses import replace

    from fedstack.audit.inversion import InversionSettings

    args = audit_parser().parse_args(argv)
    if not (args.run_dir / "config.yaml").is_file():
        print(f"fedstack audit: {args.run_dir} is not a run directory (no config.yaml)",
              file=sys.stderr)
        return 2
    settings = InversionSettings()
    if args.iterations is not None:
        settings = replace(settings, iterations=args.iterations)
    if args.restarts is not None:
        settings = replace(settings, restarts=args.restarts)
    audit = audit_run(args.run_dir, server_round=args.server_round,
                      inversion_settings=settings, max_targets=args.max_targets,
                      model_attacks=not args.no_model_attacks)
    inv = audit["inversion"]
    if inv.get("applicable"):
        print(f"inversion: {inv['matched']}/{inv['reconstructions']} reconstructions match a "
              f"training example of their target (95% CI {inv['match_share_ci95'][0]:.3f}–"
              f"{inv['match_share_ci95'][1]:.3f}); mean SSIM {inv.get('ssim_mean')}")
    else:
        print(f"inversion: not applicable: {inv.get('reason')}")
    one_run = audit.get("one_run") or {}
    for line in one_run.get("summary_lines", []) if one_run.get("applicable") else []:
        print(f"one-run DP audit: {line.removeprefix('- ')}")
    print(f"wrote {args.run_dir / AUDIT_JSON}")
    if audit["failed"]:
        print(f"fedstack audit: FAILED: {', '.join(audit['failed'])} (see {AUDIT_JSON})",
              file=sys.stderr)
        return 1
    return 0
