"""The figures of one profile configuration, from its raw samples: latency percentiles with distribution-free
intervals, decode speed, and the memory-bandwidth bound that speed is set against."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class Facts:
    """What one configuration's summary records beside its timings: measured by its worker, or read from the export."""

    load_s: float
    """Session build time: graph optimisation, weights into memory, kernels prepared (the export's sha256 excluded)."""
    rss_before_load_mb: float
    """Resident set size of the configuration's worker process before the session loads: Python, numpy,
    onnxruntime and tokenizers imported. peak_rss_mb minus this is what the model and its runs added."""
    peak_rss_mb: float
    """Peak resident set size of the worker process that measured this configuration alone, from its start to its
    last measured run (the kernel's high-water mark: VmHWM on Linux, the peak working set on Windows): the
    interpreter, the session, its arena and the KV cache."""
    model_bytes: int
    """Bytes of the export's graph files on disk (model.onnx and its external data; adapter files not included)."""
    weight_bytes_per_token: int | None
    """Bytes of the graph's weights one decode step reads, as export.json records them (the export counts them,
    edge_lora.export.graphs.weight_bytes): every initializer once, except the tables only an embedding lookup reads
    (one row per token) and weights no node reads. None for an export that does not record them."""
    adapter_bytes_per_token: int
    """Bytes of the active adapter's tensors (its LoRA A and B, all read each step); 0 without an adapter."""
    kv_cache_bytes_per_token: int
    """Bytes of the past KV cache one decode step reads, averaged over the run's decode steps. Attention reads the
    cache once; the graph's Concat of past and new keys also copies it into present.*, so real traffic is higher."""
    bandwidth_gbs: float
    """Memory bandwidth the bound is computed from, in GB/s."""
    bandwidth_source: str
    """Where bandwidth_gbs comes from: the device profile (with its own source) or this host's measurement."""


def summarize(samples: list[dict], prompt_len: int, new_tokens: int, facts: Facts) -> dict:
    """The figures of one configuration from its raw samples, with its facts."""
    ttft = np.array([s["ttft_s"] for s in samples])
    decode = np.array([s["decode_s"] for s in samples])
    e2e = np.array([s["e2e_s"] for s in samples])
    decode_tokens = new_tokens - 1  # the first new token is timed with prefill, in ttft
    ttft_p = _percentiles(ttft)
    decode_tokens_s = float(np.median(decode_tokens / decode))
    # Decode reads the weights (one row of an embedding table), the active adapter and the past KV cache once per
    # token, so tokens/s <= bandwidth / those bytes. Caches, the KV cache's copy into present.* and activations are
    # left out, so the bound is a guide, not a ceiling to the percent. Without the weights' bytes there is no bound.
    bytes_per_token = bound_tokens_s = None
    if facts.weight_bytes_per_token is not None:
        bytes_per_token = facts.weight_bytes_per_token + facts.adapter_bytes_per_token + facts.kv_cache_bytes_per_token
        bound_tokens_s = facts.bandwidth_gbs * 1e9 / bytes_per_token
    e2e_mean = float(e2e.mean())
    # Normal approximation of the 95% interval of the mean, 1.96·s/√n: with few runs it is somewhat narrower
    # than the t-interval would be. One run has no spread to estimate, hence no interval.
    ci95 = None
    if len(e2e) > 1:
        half_width = 1.96 * float(np.std(e2e, ddof=1)) / np.sqrt(len(e2e))
        ci95 = [e2e_mean - half_width, e2e_mean + half_width]
    return {
        "runs": len(samples),
        **dataclasses.asdict(facts),
        **{f"ttft_p{p}_s": v for p, v in ttft_p.items()},
        "tpot_p50_s": float(np.percentile(decode / decode_tokens, 50, method="linear")),
        "prefill_tokens_s": prompt_len / ttft_p[50],
        "decode_tokens_s": decode_tokens_s,
        **{f"e2e_p{p}_s": v for p, v in _percentiles(e2e).items()},
        **{f"e2e_p{p}_ci95_s": percentile_ci95(e2e, p) for p in PERCENTILES},
        "e2e_mean_s": e2e_mean,
        "e2e_mean_ci95_s": ci95,
        "bytes_per_token": bytes_per_token,
        "bound_tokens_s": bound_tokens_s,
        "decode_fraction_of_bound": None if bound_tokens_s is None else decode_tokens_s / bound_tokens_s,
    }


def percentile_ci95(values: np.ndarray, percentile: float) -> list[float] | None:
    """A distribution-free 95% interval of a percentile: two order statistics of the samples, chosen from the
    binomial distribution of how many samples fall below the true percentile (as MLPerf's early-stopping
    criterion reasons). None when there are too few samples to bound it at 95% on both sides: at least 6 for
    p50, 36 for p90 and 368 for p99 (with fewer, even the largest sample is too likely to lie below the percentile).
    Unlike the mean's interval, it assumes nothing of the latency distribution's shape."""
    n, q = len(values), percentile / 100
    # cdf[k] = P(B <= k) for B ~ Binomial(n, q): the chance that at most k samples fall below the percentile.
    log_pmf = [
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + (k * math.log(q) if k else 0.0)
        + ((n - k) * math.log1p(-q) if n - k else 0.0)
        for k in range(n + 1)
    ]
    cdf = np.cumsum(np.exp(log_pmf))
    # [x_(lo), x_(hi)] (1-based order statistics) covers the percentile with probability P(lo <= B < hi).
    lo = int(np.searchsorted(cdf, 0.025, side="right"))  # the largest lo with P(B < lo) <= 0.025
    hi = int(np.searchsorted(cdf, 0.975, side="left")) + 1  # the smallest hi with P(B < hi) >= 0.975
    if lo < 1 or hi > n:
        return None
    ordered = np.sort(values)
    return [float(ordered[lo - 1]), float(ordered[hi - 1])]


def _percentiles(values: np.ndarray) -> dict[int, float]:
    return {p: float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES, method="linear"))}
