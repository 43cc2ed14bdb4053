"""Writes a run's outputs as each round ends, so a crash loses at most the round in flight.

Per round: one line of `history.jsonl` (and `history.csv`), a checkpoint of the global model,
a row of the progress table in the log, fresh plots. At the end: `summary.json`.
Listeners (e.g. the privacy ledger) see every round too and add their summary fields.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ArrayRecord

from fedstack.log import logger
from fedstack.outputs import round_table
from fedstack.outputs.outcome import run_outcome
from fedstack.outputs.plots import plot_history
from fedstack.outputs.round_table import format_number
from fedstack.outputs.run_directory import HISTORY_FILE, SUMMARY_FILE, save_checkpoint
from fedstack.strategies.round_log import RoundLog

#: Scalar history keys also written to history.csv (in this order).
CSV_COLUMNS = ("round", "train_loss", "eval_loss", "eval_accuracy", "central_loss",
               "central_accuracy", "num_sampled", "num_aggregated", "num_declined",
               "num_rejected", "bytes_down", "bytes_up", "exchanges", "seconds_total",
               "epsilon_max", "aborted")


class RoundListener(Protocol):
    """Something that follows the run round by round (e.g. the privacy ledger)."""

    def on_round(self, record: dict[str, Any], round_log: RoundLog) -> None: ...

    def summary_fields(self) -> dict[str, Any]: ...

    def finish(self) -> None: ...


def history_row(round_log: RoundLog) -> dict[str, Any]:
    """One history.jsonl object from a round's log (flat keys for the common columns)."""
    rl = round_log
    epsilon = {}
    for node, metrics in rl.client_metrics.items():
        if "epsilon" in metrics:
            epsilon[str(rl.client_partitions.get(node, node))] = metrics["epsilon"]
    finite_eps = [v for v in epsilon.values() if math.isfinite(v)]
    return {
        "round": rl.server_round,
        "train_loss": rl.train_metrics.get("train-loss"),
        "eval_loss": rl.evaluate_metrics.get("eval-loss"),
        "eval_accuracy": rl.evaluate_metrics.get("eval-accuracy"),
        "central_loss": rl.central_metrics.get("loss"),
        "central_accuracy": rl.central_metrics.get("accuracy"),
        "seconds": {k: round(v, 4) for k, v in rl.seconds.items()},
        "bytes_down": rl.bytes_down,
        "bytes_up": rl.bytes_up,
        "exchanges": rl.exchanges,
        "sampled": rl.sampled,
        "aggregated": rl.aggregated,
        "declined": {str(k): v for k, v in rl.declined.items()},
        "rejected": {str(k): v for k, v in rl.rejected.items()},
        "aborted": rl.aborted,
        "rolled_back": list(rl.rolled_back),
        "epsilon": epsilon,
        "epsilon_max": max(finite_eps) if finite_eps else None,
        "extra": rl.extra,
    }


def csv_row(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: record.get(k) for k in CSV_COLUMNS}
    out["num_sampled"] = len(record.get("sampled", []))
    out["num_aggregated"] = len(record.get("aggregated", []))
    out["num_declined"] = len(record.get("declined", {}))
    out["num_rejected"] = len(record.get("rejected", {}))
    out["seconds_total"] = round(sum(record.get("seconds", {}).values()), 4)
    return out


def read_history(run_dir: Path, up_to_round: int | None = None) -> list[dict[str, Any]]:
    path = run_dir / HISTORY_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if up_to_round is not None:
        rows = [r for r in rows if r["round"] <= up_to_round]
    return rows


class RunRecorder:
    """Owns a run directory's history, checkpoints, plots and summary."""

    def __init__(self, run_dir: Path, cfg: Any, *, title: str, checkpoints: bool = True,
                 listeners: list[RoundListener] | None = None,
                 resume_from_round: int | None = None) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.title = title
        self.checkpoints = checkpoints
        self.listeners = listeners or []
        self.started = time.time()
        self.history: list[dict[str, Any]] = []
        if resume_from_round is not None:
            # Keep what was recorded up to the checkpoint; later lines (a round that was in
            # flight when the server died) are dropped and will be re-run.
            self.history = read_history(run_dir, resume_from_round)
            self._rewrite_history()
        self._table_started = False

    def _rewrite_history(self) -> None:
        tmp = self.run_dir / (HISTORY_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, self.run_dir / HISTORY_FILE)
        self._write_csv()

    def _write_csv(self) -> None:
        with open(self.run_dir / "history.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
            writer.writeheader()
            for record in self.history:
                writer.writerow(csv_row(record))

    def on_round_end(self, round_log: RoundLog, arrays: ArrayRecord) -> None:
        record = history_row(round_log)
        for listener in self.listeners:
            listener.on_round(record, round_log)
        if self.checkpoints:
            save_checkpoint(self.run_dir, round_log.server_round, arrays)
        self.history.append(record)
        with open(self.run_dir / HISTORY_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._write_csv()
        if self.cfg.log_table:
            if not self._table_started:
                for line in round_table.header().splitlines():
                    logger.info("%s", line)
                self._table_started = True
            logger.info("%s", round_table.row(record))
        if round_log.aborted:
            logger.warning("round %s kept the previous model: %s", round_log.server_round,
                           round_log.aborted)
        plot_history(self.history, self.run_dir, self.title)

    def rolled_back_rounds(self) -> list[int]:
        """Rounds discarded after their cause was found and excluded (see RoundLog)."""
        return sorted({int(n) for r in self.history if r["round"] > 0
                       for n in r.get("rolled_back") or []})

    def failed_rounds(self) -> list[int]:
        """Rounds recorded so far that produced no new global model and were not recovered
        by design (rolled back with the cause excluded)."""
        rolled_back = set(self.rolled_back_rounds())
        return [r["round"] for r in self.history
                if r["round"] > 0 and r.get("aborted") and r["round"] not in rolled_back]

    def finish(self, stop_reason: str | None = None,
               failure: str | None = None) -> dict[str, Any]:
        """Write summary.json (and let listeners write their reports); returns the summary.

        The summary's `status` is the run's one outcome (`fedstack.outputs.outcome`): only
        rounds that produced a new global model, and were not rolled back later, count as
        completed; the final metrics come from the last such round.
        """
        rounds = [r for r in self.history if r["round"] > 0]
        rolled_back = self.rolled_back_rounds()
        failed = self.failed_rounds()
        good = [r for r in rounds if not r.get("aborted") and r["round"] not in rolled_back]
        outcome = run_outcome(completed=len(good), num_rounds=int(self.cfg.num_rounds),
                              stop_reason=stop_reason, failure=failure)
        last = good[-1] if good else next((r for r in self.history if r["round"] == 0), {})
        central = last.get("central_accuracy")
        summary: dict[str, Any] = {
            "status": outcome.status,
            "reason": outcome.reason,
            "rounds_completed": len(good),
            "num_rounds": int(self.cfg.num_rounds),
            "rounds_failed": failed,
            "rounds_rolled_back": rolled_back,
            "failure_reasons": {str(r["round"]): r["aborted"] for r in rounds
                                if r.get("aborted")},  # failed and rolled-back rounds
            "final_round": last.get("round"),
            "final_accuracy": central if central is not None else last.get("eval_accuracy"),
            "final_loss": (last.get("central_loss") if central is not None
                           else last.get("eval_loss")),
            "final_accuracy_source": "central" if central is not None else "federated",
            "final_federated_accuracy": last.get("eval_accuracy"),
            "aggregation": str(self.cfg.aggregation.name),
            "dp": str(self.cfg.dp.name),
            "task": str(self.cfg.task.name),
            "partition": str(self.cfg.partition.name),
            "num_clients": int(self.cfg.num_clients),
            "seed": int(self.cfg.seed),
            "stop_reason": stop_reason,
            "total_bytes_down": sum(r.get("bytes_down", 0) for r in rounds),
            "total_bytes_up": sum(r.get("bytes_up", 0) for r in rounds),
            "seconds_this_process": round(time.time() - self.started, 2),
            "run_dir": str(self.run_dir),
        }
        for listener in self.listeners:
            summary.update(listener.summary_fields())
            listener.finish()
        tmp = self.run_dir / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.run_dir / SUMMARY_FILE)
        report = logger.info if outcome.succeeded else logger.error
        report("run %s%s: %s of %s rounds produced a model, final accuracy %s (%s); "
               "outputs in %s", outcome.status,
               f" ({outcome.reason})" if outcome.reason else "", summary["rounds_completed"],
               summary["num_rounds"], format_number(summary["final_accuracy"]),
               summary["final_accuracy_source"], self.run_dir)
        return summary
