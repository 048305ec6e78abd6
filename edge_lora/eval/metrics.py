"""The metrics: how one output is scored against its reference, and how scores become a figure with a 95%
confidence interval.

exact     the output equals the reference once surrounding whitespace is stripped; a proportion (Wilson)
contains  the stripped reference occurs in the output; a proportion (Wilson)
token-f1  F1 of the bags of words of output and reference, lower-cased, punctuation as spaces (SQuAD's F1
          without its English article removal); the mean over samples (percentile bootstrap)
perplexity  exp of the mean negative log-likelihood per reference token, the end-of-sequence token included
          (the quantity training's eval_loss averages), pooled over all samples (percentile bootstrap)
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Literal

MetricName = Literal["exact", "contains", "token-f1", "perplexity"]
METRICS: tuple[str, ...] = ("exact", "contains", "token-f1", "perplexity")  # the CLI's choices: this module
# imports numpy only inside the functions that need it, so that reading METRICS costs the CLI nothing
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


@dataclass(frozen=True)
class Summary:
    """One metric over one data file."""

    value: float
    """The figure as a fraction (exact, contains, token-f1) or a perplexity."""
    ci_low: float
    ci_high: float
    ci_method: str
    """How the 95% interval was computed."""
    samples: int


def exact(output: str, reference: str) -> float:
    return float(output.strip() == reference.strip())


def contains(output: str, reference: str) -> float:
    return float(reference.strip() in output)


def words(text: str) -> list[str]:
    return _PUNCTUATION.sub(" ", text.lower()).split()


def token_f1(output: str, reference: str) -> float:
    got, want = Counter(words(output)), Counter(words(reference))
    if not got or not want:
        return float(got == want)
    common = sum((got & want).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


SCORERS = {"exact": exact, "contains": contains, "token-f1": token_f1}


def nll(logits, targets: list[int]) -> float:
    """Summed negative log-likelihood of `targets` under `logits` (len(targets), vocab), the row before each
    target predicting it; computed in float64 so that long references do not lose precision."""
    import numpy as np

    rows = np.asarray(logits, dtype=np.float64)
    peak = rows.max(axis=-1, keepdims=True)
    log_z = (peak + np.log(np.exp(rows - peak).sum(axis=-1, keepdims=True)))[:, 0]
    return float((log_z - rows[np.arange(len(targets)), targets]).sum())


def summarise(
    metric: MetricName, scores: list[float], nlls: list[float] | None = None, tokens: list[int] | None = None
) -> Summary:
    """The figure and its 95% interval: `scores` for exact/contains/token-f1, `nlls` and `tokens` for perplexity."""
    import numpy as np

    from edge_lora.eval import stats

    if metric == "perplexity":
        nll_sum, token_sum = float(np.sum(nlls)), int(np.sum(tokens))
        low, high = stats.bootstrap((np.array(nlls), np.array(tokens)), lambda n_, t_, n: np.exp(n_ / t_))
        return Summary(math.exp(nll_sum / token_sum), low, high, bootstrap_method(), len(nlls))
    n = len(scores)
    if metric in ("exact", "contains"):
        low, high = stats.wilson(int(sum(scores)), n)
        return Summary(sum(scores) / n, low, high, "Wilson score", n)
    low, high = stats.bootstrap((np.array(scores),), lambda s, n_: s / n_)
    return Summary(sum(scores) / n, low, high, bootstrap_method(), n)


def bootstrap_method() -> str:
    from edge_lora.eval import stats

    return f"percentile bootstrap, {stats.BOOTSTRAP_RESAMPLES} resamples"


def higher_is_better(metric: MetricName) -> bool:
    return metric != "perplexity"


def points(metric: MetricName, value: float) -> float:
    """A figure in the units tables print and --fail-if-worse counts: percent, or perplexity as it is."""
    return value if metric == "perplexity" else 100 * value


def show(metric: MetricName, value: float) -> str:
    return f"{value:.3f}" if metric == "perplexity" else f"{100 * value:.1f}%"
