"""The audit's human-readable outputs: a section of privacy_report.md and audit.png.

The section has two parts. "Audit mode" is there whenever the run recorded a server view
(`audit.record_round`, read from the run's config.yaml, so it shows from the first round on):
the report must say that the server kept more than it needs. "Measured attacks" appears once
`fedstack audit RUN_DIR` has written audit.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: Files in the run directory.
AUDIT_JSON = "audit.json"
AUDIT_PLOT = "audit.png"
CONFIG_FILE = "config.yaml"


def _record_round(run_dir: Path) -> int | None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    value = (data.get("audit") or {}).get("record_round")
    return int(value) if value is not None else None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _ci(pair: list[float] | None, fmt: Any = _num) -> str:
    return "" if not pair else f" (95% CI {fmt(pair[0])}–{fmt(pair[1])})"


def inversion_lines(inv: dict[str, Any]) -> list[str]:
    lines = ["### Update inversion (Geiping et al. 2020) on the recorded view", ""]
    if not inv.get("applicable"):
        lines.append(f"Not applicable: {inv.get('reason')}.")
        he = inv.get("he_decryption")
        if he:
            lines.append(f"Decrypting the {he['replies']} recorded encrypted replies with the "
                         f"server's context: refused {he['decryption_refused']} of "
                         f"{he['replies']} ({'; '.join(he['reasons']) or 'no reason'}).")
        return lines
    lines += [
        f"- reconstructions matching a training example of the target client: "
        f"{inv['matched']} of {inv['reconstructions']} = {_pct(inv['match_share'])}"
        f"{_ci(inv.get('match_share_ci95'), _pct)}",
        f"- mean PSNR {_num(inv.get('psnr_mean'))} dB{_ci(inv.get('psnr_ci95'))}, mean SSIM "
        f"{_num(inv.get('ssim_mean'))}{_ci(inv.get('ssim_ci95'))}, mean nearest-neighbour "
        f"correlation {_num(inv.get('correlation_mean'))}",
        f"- match rule: {inv['match_rule']}",
        "",
        "| target | examples in it | reconstructed | labels right | matched (per client) |",
        "|---|---|---|---|---|",
    ]
    for t in inv.get("targets", []):
        per = ", ".join(f"client {c}: {s['matched']}/{s['reconstructions']}"
                        for c, s in t["per_client"].items())
        lines.append(f"| {t['label']} | {t['batch_observed']} | {t['batch_reconstructed']} | "
                     f"{_pct(t['labels_right'])} | {per} |")
    return lines


def _generic_lines(title: str, section: dict[str, Any]) -> list[str]:
    """A section produced by another attack module: its own summary lines, or its flat
    scalar fields."""
    lines = [f"### {title}", ""]
    if section.get("summary_lines"):
        return lines + [str(x) for x in section["summary_lines"]]
    for key, value in section.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            lines.append(f"- `{key}`: {_num(value)}")
    return lines


def audit_section(run_dir: Path) -> list[str]:
    """Markdown lines for privacy_report.md ([] when audit mode was off and no audit ran)."""
    run_dir = Path(run_dir)
    record_round = _record_round(run_dir)
    audit_path = run_dir / AUDIT_JSON
    from fedstack.audit.canaries import CANARY_FILE, load_plan

    canary_path = run_dir / CANARY_FILE
    if record_round is None and not audit_path.is_file() and not canary_path.is_file():
        return []
    lines = ["## Privacy audit", ""]
    if canary_path.is_file():
        plan = load_plan(run_dir)
        lines += [f"**Audit canaries were in**: {plan.m} `{plan.kind}` canaries were put into "
                  f"the training data of clients {list(plan.holders)}, each with probability "
                  f"1/2 (`{CANARY_FILE}` holds which: the audit secret); the model was trained "
                  "on records their owners never had.", ""]
    if record_round is not None:
        lines += [f"**Audit mode was on**: the server kept everything it sent and received "
                  f"in round {record_round} (and the sum it computed) under "
                  f"`audit/round_{record_round}/`, for `fedstack audit`. Under fedavg and "
                  "dp=local that is every sampled client's update; delete the directory "
                  "once audited.", ""]
    if audit_path.is_file():
        audit = json.loads(audit_path.read_text())
        lines += [f"Measured by `fedstack audit` ({AUDIT_JSON}, {AUDIT_PLOT}): what an "
                  "attacker holding the server's view and the final model achieves.", ""]
        if "inversion" in audit:
            lines += [*inversion_lines(audit["inversion"]), ""]
        for key, title in (("membership", "Membership inference on the final model"),
                           ("one_run", "One-run DP audit (Steinke, Nasr, Jagielski 2023)")):
            if isinstance(audit.get(key), dict):
                lines += [*_generic_lines(title, audit[key]), ""]
    return lines


def write_audit_plot(audit: dict[str, Any], path: Path) -> Path | None:
    """Nearest-neighbour correlation of every reconstruction per target against its match
    threshold (None when no inversion ran)."""
    inv = audit.get("inversion") or {}
    if not inv.get("applicable"):
        return None
    from matplotlib.figure import Figure

    from fedstack.outputs.plots import DPI, FIGSIZE

    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    labels = []
    for i, target in enumerate(inv["targets"]):
        for client, s in target["per_client"].items():
            x = len(labels)
            labels.append(f"{target['label']}\nvs client {client}" if target["kind"] ==
                          "aggregate" else target["label"])
            ax.scatter([x] * len(s["correlations"]), s["correlations"], s=12,
                       color=f"C{i % 10}")
            ax.hlines(s["threshold"], x - 0.4, x + 0.4, colors="grey", linestyles="--",
                      label="match threshold" if x == 0 else None)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="x-small")
    ax.set_ylim(-1.0, 1.0)
    ax.set_ylabel("correlation with nearest training example")
    ax.set_title(f"Update inversion, round {inv['round']}: {inv['aggregation']}, "
                 f"dp={inv['dp']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path
