"""A run's outcome as one truthful fact: `summary.json`'s `status` and the exit code agree.

- `completed`: every planned round ran, and at least one produced a new global model;
- `stopped`: the run ended early by design (e.g. every client's privacy budget is spent),
  with the reason;
- `failed`: an error ended the run, too many rounds failed (`max_failed_rounds`), or no
  round produced a model; with the reason.

`fedstack run` exits non-zero unless every job `succeeded`; `fedstack outcome` reads the
summaries a run left behind, for wrappers of `flwr run` (which exits 0 even when the
ServerApp crashed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedstack.outputs.round_table import format_number
from fedstack.outputs.run_directory import SUMMARY_FILE, output_base

COMPLETED = "completed"
STOPPED = "stopped"
FAILED = "failed"
#: Statuses that end `fedstack run` / `make run` with exit code 0.
SUCCESS_STATUSES = (COMPLETED, STOPPED)


@dataclass(frozen=True)
class RunOutcome:
    status: str
    reason: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status in SUCCESS_STATUSES


def run_outcome(*, completed: int, num_rounds: int, stop_reason: str | None,
                failure: str | None) -> RunOutcome:
    """The status of a run from what happened (failure first: it outranks everything)."""
    if failure:
        return RunOutcome(FAILED, failure)
    if stop_reason:
        return RunOutcome(STOPPED, stop_reason)
    if completed == 0 and num_rounds > 0:
        return RunOutcome(FAILED, "no round produced a new global model")
    return RunOutcome(COMPLETED)


def read_outcomes(base: Path, newer_than: float | None = None) -> list[dict]:
    """Summaries of the runs under `base` (a run dir or a directory of them).

    `newer_than` (a UNIX time) keeps only summaries written after it: what one invocation of
    `flwr run` produced.
    """
    base = Path(base)
    paths = [base / SUMMARY_FILE] if (base / SUMMARY_FILE).exists() else sorted(
        base.glob(f"*/{SUMMARY_FILE}"))
    found = []
    for path in paths:
        if newer_than is not None and path.stat().st_mtime < newer_than:
            continue
        summary = json.loads(path.read_text())
        summary.setdefault("run_dir", str(path.parent))
        found.append(summary)
    return found


def outcome_main(argv: list[str]) -> int:
    """`fedstack outcome DIR [--newer-than FILE]`: exit 0 iff the run(s) there succeeded."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="fedstack outcome",
        description="Read the summary.json of a run (or of every run under a directory) and "
                    "exit non-zero unless each one completed or stopped by design. Exits 1 "
                    "when no run is found: a run that failed before it started leaves none.")
    parser.add_argument("path", help="a run directory or a directory of runs (relative: "
                                      "to FEDSTACK_OUTPUT_BASE if set, like output_dir)")
    parser.add_argument("--newer-than", type=Path, default=None, metavar="FILE",
                        help="only runs whose summary was written after FILE was modified")
    args = parser.parse_args(argv)
    args.path = output_base(args.path)
    since = args.newer_than.stat().st_mtime if args.newer_than is not None else None
    summaries = read_outcomes(args.path, since) if args.path.exists() else []
    if not summaries:
        print(f"fedstack outcome: no finished run found under {args.path}"
              + (" since the run started" if since is not None else "")
              + ": the run failed before writing its summary (see the log above)")
        return 1
    ok = True
    for summary in summaries:
        status = summary.get("status", FAILED)
        ok = ok and status in SUCCESS_STATUSES
        reason = summary.get("reason")
        print(f"{status}{f' ({reason})' if reason else ''}: "
              f"{summary.get('rounds_completed')} of {summary.get('num_rounds')} rounds, "
              f"final accuracy {format_number(summary.get('final_accuracy'))} "
              f"-> {summary['run_dir']}")
    return 0 if ok else 1
