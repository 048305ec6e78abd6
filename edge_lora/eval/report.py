"""Eval results for people (plain-text tables) and for programs (one JSON object per sample)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from edge_lora.eval import metrics
from edge_lora.eval.compare import ALPHA, Comparison
from edge_lora.eval.run import EvalReport


def grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def interval(metric: str, low: float, high: float) -> str:
    return f"[{metrics.show(metric, low)}, {metrics.show(metric, high)}]"


def eval_table(report: EvalReport) -> str:
    rows = [
        [
            f.data,
            str(f.summary.samples),
            metrics.show(report.metric, f.summary.value),
            interval(report.metric, f.summary.ci_low, f.summary.ci_high),
            f.summary.ci_method,
            f"{f.latency_p50_s * 1e3:.1f} ms",
        ]
        for f in report.files
    ]
    header = ["data", "samples", report.metric, "95% CI", "CI method", "latency p50"]
    return f"{report.target} — metric {report.metric}\n{grid(header, rows)}"


def compare_table(comparison: Comparison) -> str:
    metric = comparison.old.metric
    unit = "" if metric == "perplexity" else " pts"
    rows = []
    for p in comparison.pairings:
        low, high = p.delta_ci
        verdict = "WORSE" if p.worse_beyond_margin else ("pass" if comparison.margin is not None else "-")
        rows.append(
            [
                p.data,
                str(p.old.samples),
                metrics.show(metric, p.old.value),
                metrics.show(metric, p.new.value),
                f"{p.delta_points:+.2f}{unit}",
                f"[{low:+.2f}, {high:+.2f}]",
                f"{p.new_better}/{p.new_worse}/{p.ties}",
                f"{p.p_value:.3g} ({p.test})",
                verdict,
            ]
        )
    header = [
        "data",
        "samples",
        "OLD",
        "NEW",
        "NEW-OLD",
        "95% CI (paired bootstrap)",
        "better/worse/ties",
        "p",
        "verdict",
    ]
    gate = (
        "no gate (pass --fail-if-worse POINTS)"
        if comparison.margin is None
        else f"gate: NEW fails where it is worse by more than {comparison.margin:g}{unit} and p < {ALPHA}"
    )
    title = f"OLD {comparison.old.target} -> NEW {comparison.new.target} — metric {metric}; {gate}"
    return f"{title}\n{grid(header, rows)}"


def write_samples(reports: list[EvalReport], path: str | Path) -> Path:
    """One JSON object per sample and target: target, data, and the SampleResult's fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for report in reports:
            for file in report.files:
                for sample in file.samples:
                    row = {
                        "target": report.target,
                        "data": file.data,
                        "metric": report.metric,
                        **dataclasses.asdict(sample),
                    }
                    f.write(json.dumps(row) + "\n")
    return path
