"""Confidence intervals and the paired test of the regression gate; numpy and the stdlib only.

- a proportion (exact, contains): the Wilson score interval, which stays inside [0, 1] and is sound for small n
  and for 0 or n successes, where the normal approximation is not;
- a mean or a ratio of sums (token-f1, perplexity): the percentile bootstrap over samples;
- two targets on the same samples: the exact two-sided sign test on the samples where they differ. For 0/1
  scores that is McNemar's exact test (a binomial test on the discordant pairs); for continuous scores it is the
  sign test, which needs no assumption about the shape of the differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

LEVEL = 0.95
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
_CHUNK_CELLS = 20_000_000  # resample matrix cells per chunk: bounds memory at ~160 MB for 100k samples


def wilson(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(
    columns: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over samples.

    `columns` are per-sample arrays of one length n; `statistic` takes their resampled sums, each of shape
    (resamples,), together with n, and returns the statistic per resample: a mean is `lambda s, n: s / n`, a
    perplexity `lambda nll, tokens, n: exp(nll / tokens)`. Resampling is drawn as counts per sample, in chunks.
    """
    n = len(columns[0])
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    per_chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, resamples, per_chunk):
        counts = rng.multinomial(n, np.full(n, 1 / n), size=min(per_chunk, resamples - start))  # (chunk, n)
        sums = [counts @ np.asarray(column, dtype=np.float64) for column in columns]
        values.append(statistic(*sums, n))
    values = np.concatenate(values)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def sign_test(better: int, worse: int) -> float:
    """Exact two-sided p-value that `better` and `worse` (counts of samples where one target beat the other;
    ties left out) come from a fair coin. 1.0 when the targets never differ."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    # the binomial(n, 1/2) lower tail in log space: exact integers of 2**n digits would be slow for large n
    log_half_n = n * math.log(2)
    tail = sum(
        math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - log_half_n) for i in range(k + 1)
    )
    return min(1.0, 2 * tail)
