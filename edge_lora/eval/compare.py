"""`compare()`: the regression gate between two targets (two adapter versions, or two exports such as fp32 and
int4) on the same samples.

The gate: NEW fails on a data file when both
  1. it is worse than OLD by more than the margin, in the units the table prints (percentage points for exact,
     contains and token-f1; perplexity for perplexity), and
  2. the difference is not chance: the exact two-sided sign test on the samples where the two differ gives
     p < 0.05 (for exact and contains this is McNemar's exact test).
A drop beyond the margin on too few samples to tell, or a significant drop within the margin, passes. The
table also gives a paired bootstrap 95% interval of NEW - OLD, for reading, not for the gate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.eval import metrics, stats, targets
from edge_lora.eval.metrics import MetricName, Summary
from edge_lora.eval.run import EvalReport, EvalSettings, SampleResult, check_target, read_files, run, summarise
from edge_lora.eval.samples import EvalError

ALPHA = 0.05


@dataclass(frozen=True)
class Pairing:
    """OLD and NEW on one data file, sample by sample."""

    data: str
    metric: MetricName
    old: Summary
    new: Summary
    delta_points: float
    """NEW - OLD in table units: positive means NEW scores higher (for perplexity: is more perplexed)."""
    delta_ci: tuple[float, float]
    """Paired bootstrap 95% interval of delta_points."""
    new_better: int
    new_worse: int
    ties: int
    p_value: float
    """Exact two-sided sign test on the samples that differ (McNemar's exact test for 0/1 scores)."""
    test: str
    worse_beyond_margin: bool
    """The gate's verdict: a drop larger than the margin with p < 0.05."""

    @property
    def drop_points(self) -> float:
        """How much worse NEW is, in table units (negative: better)."""
        return -self.delta_points if metrics.higher_is_better(self.metric) else self.delta_points


@dataclass(frozen=True)
class Comparison:
    old: EvalReport
    new: EvalReport
    margin: float | None
    """--fail-if-worse in table units; None reports without gating."""
    pairings: tuple[Pairing, ...]

    @property
    def failed(self) -> bool:
        return any(p.worse_beyond_margin for p in self.pairings)


def check_same_tokenizer(old: targets.TargetSpec, new: targets.TargetSpec) -> None:
    a, b = old.tokenizer_digest(), new.tokenizer_digest()
    if a != b:
        raise EvalError(
            f"OLD {old.path} and NEW {new.path} have different tokenizers (tokenizer.json digest "
            f"{a[:12]}… vs {b[:12]}…) — the same samples would be different token sequences; "
            "compare targets built on the same base model"
        )


def compare(
    old: str | Path,
    new: str | Path,
    data: list[str | Path],
    settings: EvalSettings = EvalSettings(),
    margin: float | None = None,
    old_adapter: str | None = None,
    new_adapter: str | None = None,
    show_progress: bool = True,
) -> Comparison:
    """Evaluate OLD and NEW on the same files and pair their samples. Every check on the inputs runs before the
    first model is loaded."""
    if margin is not None and not (margin >= 0 and math.isfinite(margin)):
        raise EvalError(f"--fail-if-worse {margin} must be a number of points >= 0 — for example 2")
    old_spec, new_spec = targets.spec(old, old_adapter), targets.spec(new, new_adapter)
    check_same_tokenizer(old_spec, new_spec)
    check_target(old_spec, settings.metric)
    check_target(new_spec, settings.metric)
    files = read_files(data, settings.metric)
    reports = []
    for spec_, name in ((old_spec, "OLD"), (new_spec, "NEW")):
        loaded = targets.load(spec_, base=settings.base, device=settings.device, threads=settings.threads)
        reports.append(run(loaded, files, settings, show_progress, description=f"eval {name}"))
        del loaded  # one model in memory at a time
    old_report, new_report = reports
    pairings = tuple(
        pair(a.data, a.samples, b.samples, settings.metric, margin) for a, b in zip(old_report.files, new_report.files)
    )
    return Comparison(old_report, new_report, margin, pairings)


def pair(
    data: str, old: Sequence[SampleResult], new: Sequence[SampleResult], metric: MetricName, margin: float | None
) -> Pairing:
    """OLD's and NEW's results on the same samples, in the same order, paired."""
    old_loss = np.array([s.loss for s in old])
    new_loss = np.array([s.loss for s in new])
    better, worse = int((new_loss < old_loss).sum()), int((new_loss > old_loss).sum())
    p_value = stats.sign_test(better, worse)
    old_summary, new_summary = summarise(metric, list(old)), summarise(metric, list(new))
    delta = metrics.points(metric, new_summary.value) - metrics.points(metric, old_summary.value)
    if metric == "perplexity":
        tokens = np.array([s.tokens for s in old], dtype=np.float64)  # equal tokenizers: equal counts
        columns = (np.array([s.nll for s in old]), np.array([s.nll for s in new]), tokens)
        ci = stats.bootstrap(columns, lambda a, b, t, n: np.exp(b / t) - np.exp(a / t))
    else:
        diff = np.array([s.score for s in new]) - np.array([s.score for s in old])
        ci = stats.bootstrap((diff,), lambda d, n: 100 * d / n)
    pairing = Pairing(
        data,
        metric,
        old_summary,
        new_summary,
        delta,
        ci,
        better,
        worse,
        len(old) - better - worse,
        p_value,
        "McNemar exact" if metric in ("exact", "contains") else "sign test",
        False,
    )
    failed = margin is not None and pairing.drop_points > margin and p_value < ALPHA
    return dataclasses.replace(pairing, worse_beyond_margin=failed)
