"""Latency profile of an export, single-stream (one request at a time, as MLPerf's single-stream scenario).

For each thread count and prompt length: build a session, warm it up, then time whole generations until both
a minimum number of runs and a minimum measured time are reached. Every raw sample is kept next to the summary,
and decode speed is set against the memory-bandwidth bound of the device profile (DESIGN.md: measuring).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil

from edge_lora import devices, runtime
from edge_lora.runtime.generate import SamplingConfig
from edge_lora.runtime.package import ExportDir, open_export

SCHEMA = "edge-lora/profile"
SCHEMA_VERSION = 1
PERCENTILES = (50, 90, 99)
# Weight files of the graph: model.onnx and its external data (model.onnx.data, model.onnx_data).
MODEL_FILE_SUFFIXES = (".onnx", ".data", ".onnx_data")
# Ids from 3 up skip the ids tokenizers most often reserve for padding, BOS and EOS.
FIRST_PROMPT_ID = 3
PROMPT_SEED = 0


class ProfileError(ValueError):
    """Settings the profiler cannot run with; the message says which value and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ProfileSettings:
    """What to measure, and how long."""

    threads: tuple[int, ...] = (0,)
    """Intra-op thread counts to sweep; 0 takes the device profile's (one per physical core where it says 0)."""
    prompt_lens: tuple[int, ...] = (128,)
    """Prompt lengths in tokens to sweep."""
    new_tokens: int = 64
    """New tokens per run, forced past any end-of-sequence token; the first comes with prefill."""
    warmup_runs: int = 2
    """Runs per configuration before measuring, not recorded (allocator arenas, caches, lazy init)."""
    min_runs: int = 5
    """Measure at least this many runs per configuration..."""
    min_seconds: float = 2.0
    """...and keep measuring until the runs' end-to-end times add up to at least this many seconds."""
    providers: tuple[str, ...] | None = None
    """Execution providers in priority order; None takes the device profile's."""
    device: str | None = None
    """Device profile name or .toml path; None takes the one the export was made for."""

    def __post_init__(self) -> None:
        problems = []
        if not self.threads or any(t < 0 for t in self.threads):
            problems.append(f"threads={list(self.threads)} must be one or more counts >= 0 (0: the device profile's)")
        if not self.prompt_lens or any(n < 1 for n in self.prompt_lens):
            problems.append(f"prompt_lens={list(self.prompt_lens)} must be one or more lengths >= 1")
        if self.new_tokens < 2:
            problems.append(f"new_tokens={self.new_tokens} must be >= 2: the first token comes with prefill, "
                            "decode speed needs at least one more")
        if self.warmup_runs < 0:
            problems.append(f"warmup_runs={self.warmup_runs} must be >= 0")
        if self.min_runs < 1:
            problems.append(f"min_runs={self.min_runs} must be >= 1")
        if self.min_seconds < 0:
            problems.append(f"min_seconds={self.min_seconds} must be >= 0")
        if self.providers is not None and not self.providers:
            problems.append("providers=() is empty — name at least one, or pass None for the device profile's")
        if problems:
            raise ProfileError("; ".join(problems))


def profile(export_dir: str | Path, settings: ProfileSettings) -> dict:
    """Measure every (threads, prompt length) configuration of `settings` on the export; the report as a dict."""
    # Verified once here, so that the digest in the report stands for the files measured; each configuration
    # then loads without hashing again, and load_s is the session build alone.
    export = open_export(export_dir, verify=True)
    context = export.manifest["kv_cache"]["context_length"]
    for prompt_len in settings.prompt_lens:
        if prompt_len + settings.new_tokens > context:
            raise ProfileError(
                f"prompt_len {prompt_len} + new_tokens {settings.new_tokens} exceeds the context of {context} "
                "tokens — use shorter prompt lengths or fewer new tokens"
            )
    device_profile = runtime.device_profile(export, settings.device)
    host = dataclasses.asdict(devices.detect(ort.get_available_providers())) | {"onnxruntime": ort.__version__}
    model_bytes = sum((export.path / name).stat().st_size
                      for name in export.manifest["files"] if name.endswith(MODEL_FILE_SUFFIXES))

    configurations = []
    for threads in settings.threads:
        for prompt_len in settings.prompt_lens:
            configurations.append(_measure(export, settings, device_profile, threads, prompt_len, model_bytes))
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": host,
        "device_profile": device_profile.to_dict(),
        "export": {
            "path": str(export.path.resolve()),
            "digest": export.digest(),
            "precision": export.manifest["precision"],
            "flavor": export.manifest["flavor"],
        },
        "settings": dataclasses.asdict(settings),
        "configurations": configurations,
    }


def _measure(export: ExportDir, settings: ProfileSettings, device_profile: devices.DeviceProfile, threads: int,
             prompt_len: int, model_bytes: int) -> dict:
    """Load, warm up and time one configuration: its raw samples and their summary."""
    start = time.perf_counter_ns()
    generator = runtime.load(export.path, providers=None if settings.providers is None else list(settings.providers),
                             device=settings.device, threads=threads or None, verify=False)
    load_s = (time.perf_counter_ns() - start) / 1e9
    process = psutil.Process()
    # onnxruntime's CPU arena keeps what a run allocated, so the RSS after load and after each run tracks the
    # peak of the process (Python and onnxruntime together) without a sampling thread disturbing the timings.
    peak_rss = process.memory_info().rss

    # Latency does not depend on which tokens the prompt holds, only on how many: random ids, seeded so that
    # every configuration and every run of the profiler sees the same prompt.
    vocab_size = export.manifest["vocab_size"]
    prompt = np.random.default_rng(PROMPT_SEED).integers(FIRST_PROMPT_ID, vocab_size, prompt_len).tolist()
    sampling = SamplingConfig(max_new_tokens=settings.new_tokens, ignore_eos=True)

    for _ in range(settings.warmup_runs):
        generator.generate(prompt, sampling)
    samples = []
    measured_s = 0.0
    while len(samples) < settings.min_runs or measured_s < settings.min_seconds:
        start = time.perf_counter_ns()
        generation = generator.generate(prompt, sampling)
        # End to end as the caller sees it: ttft + decode plus tokenizing and detokenizing.
        e2e_s = (time.perf_counter_ns() - start) / 1e9
        peak_rss = max(peak_rss, process.memory_info().rss)
        samples.append({
            "ttft_s": generation.ttft_s,
            "decode_s": sum(generation.token_times_s),
            "e2e_s": e2e_s,
            "token_times_s": generation.token_times_s,
        })
        measured_s += e2e_s
    return {
        "threads": generator.session.get_session_options().intra_op_num_threads,
        "prompt_len": prompt_len,
        "new_tokens": settings.new_tokens,
        "samples": samples,
        "summary": summarize(samples, prompt_len, settings.new_tokens, load_s, peak_rss, model_bytes,
                             device_profile.bandwidth_gbs),
    }


def summarize(samples: list[dict], prompt_len: int, new_tokens: int, load_s: float, peak_rss_bytes: int,
              model_bytes: int, bandwidth_gbs: float) -> dict:
    """The figures of one configuration from its raw samples."""
    ttft = np.array([s["ttft_s"] for s in samples])
    decode = np.array([s["decode_s"] for s in samples])
    e2e = np.array([s["e2e_s"] for s in samples])
    decode_tokens = new_tokens - 1  # the first new token is timed with prefill, in ttft
    ttft_p = _percentiles(ttft)
    decode_tokens_s = float(np.median(decode_tokens / decode))
    # Decode reads every weight once per token, so tokens/s <= bandwidth / weight bytes. This approximation
    # ignores the KV cache (which adds bytes per token) and counts the whole embedding table (of which a token
    # reads one row), so the bound is a guide, not a ceiling to the percent.
    bytes_per_token = model_bytes
    bound_tokens_s = bandwidth_gbs * 1e9 / bytes_per_token
    e2e_mean = float(e2e.mean())
    # Normal approximation of the 95% interval of the mean, 1.96·s/√n: with few runs it is somewhat narrower
    # than the t-interval would be. One run has no spread to estimate, hence no interval.
    ci95 = None
    if len(e2e) > 1:
        half_width = 1.96 * float(np.std(e2e, ddof=1)) / np.sqrt(len(e2e))
        ci95 = [e2e_mean - half_width, e2e_mean + half_width]
    return {
        "runs": len(samples),
        "load_s": load_s,
        **{f"ttft_p{p}_s": v for p, v in ttft_p.items()},
        "tpot_p50_s": float(np.percentile(decode / decode_tokens, 50, method="linear")),
        "prefill_tokens_s": prompt_len / ttft_p[50],
        "decode_tokens_s": decode_tokens_s,
        **{f"e2e_p{p}_s": v for p, v in _percentiles(e2e).items()},
        "e2e_mean_s": e2e_mean,
        "e2e_mean_ci95_s": ci95,
        "peak_rss_mb": peak_rss_bytes / 2**20,
        "model_bytes": model_bytes,
        "bytes_per_token": bytes_per_token,
        "bandwidth_gbs": bandwidth_gbs,
        "bound_tokens_s": bound_tokens_s,
        "decode_fraction_of_bound": decode_tokens_s / bound_tokens_s,
    }


def _percentiles(values: np.ndarray) -> dict[int, float]:
    return {p: float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES, method="linear"))}


# Columns of the Markdown table: header, and the cell of one configuration (its summary as `s`).
TABLE_COLUMNS = (
    ("threads", lambda c, s: f"{c['threads']}"),
    ("prompt", lambda c, s: f"{c['prompt_len']}"),
    ("TTFT p50 (ms)", lambda c, s: f"{s['ttft_p50_s'] * 1e3:.1f}"),
    ("decode tok/s", lambda c, s: f"{s['decode_tokens_s']:.1f}"),
    ("e2e p50 (ms)", lambda c, s: f"{s['e2e_p50_s'] * 1e3:.1f}"),
    ("e2e p99 (ms)", lambda c, s: f"{s['e2e_p99_s'] * 1e3:.1f}"),
    ("peak RSS (MB)", lambda c, s: f"{s['peak_rss_mb']:.0f}"),
    ("of bandwidth bound", lambda c, s: f"{s['decode_fraction_of_bound']:.1%}"),
)


def render_table(report: dict) -> str:
    """One Markdown table row per configuration."""
    rows = [[header for header, _ in TABLE_COLUMNS], ["---:"] * len(TABLE_COLUMNS)]
    rows += [[cell(c, c["summary"]) for _, cell in TABLE_COLUMNS] for c in report["configurations"]]
    return "".join("| " + " | ".join(row) + " |\n" for row in rows)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write profile.json (the whole report) and profile.md (the table) into out_dir; their paths by format."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "profile.json", "markdown": out_dir / "profile.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    export, host = report["export"], report["host"]
    new_tokens = report["settings"]["new_tokens"]
    paths["markdown"].write_text(
        f"# Profile of {export['path']}\n\n"
        f"{export['precision']} {export['flavor']} export {export['digest'][:12]}, {new_tokens} new tokens per run, "
        f"device profile {report['device_profile']['name']}, on {host['cpu_model']} "
        f"({host['physical_cores']} cores), onnxruntime {host['onnxruntime']}, {report['created']}.\n\n"
        + render_table(report)
    )
    return paths
