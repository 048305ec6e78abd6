"""Latency profile of one or more exports, single-stream (one request at a time, as MLPerf's single-stream scenario).

A sweep runs every export (one per precision, say) × execution provider × thread count × prompt length. For each
configuration: build a session, warm it up, then time whole generations until both a minimum number of runs and
a minimum measured time are reached. Every raw sample is kept next to the summary, and decode speed is set
against the memory-bandwidth bound (DESIGN.md: measuring). A provider this host lacks gives an "unavailable" row.
Reports are written by edge_lora.runtime.report and compared by edge_lora.runtime.compare.
"""

from __future__ import annotations

import dataclasses
import datetime
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil

from edge_lora import devices, runtime
from edge_lora.runtime.generate import SamplingConfig
from edge_lora.runtime.package import ExportDir, open_export
from edge_lora.runtime.report import short
from edge_lora.runtime.trace import summarize_trace

SCHEMA = "edge-lora/profile"
SCHEMA_VERSION = 2
PERCENTILES = (50, 90, 99)
# Weight files of the graph: model.onnx and its external data (model.onnx.data, model.onnx_data).
MODEL_FILE_SUFFIXES = (".onnx", ".data", ".onnx_data")
# Ids from 3 up skip the ids tokenizers most often reserve for padding, BOS and EOS.
FIRST_PROMPT_ID = 3
PROMPT_SEED = 0
MEASURED_BANDWIDTH_SOURCE = "measured on this host: best-of-5 single-thread memcpy of 256 MiB (devices.detect)"


class ProfileError(ValueError):
    """Settings or reports the profiler cannot work with; the message says which value and how to fix it."""


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
    """Execution providers to sweep, each on its own (with the CPU provider behind it for the nodes it lacks);
    one this host lacks gives "unavailable" rows. None: the device profile's provider list, as one configuration."""
    device: str | None = None
    """Device profile name or .toml path; None takes the one the first export was made for."""
    trace: bool = False
    """Also trace one generation per configuration with onnxruntime profiling, on a session of its own so that
    profiling does not slow the measured runs, and summarise the trace as the top operators by time."""
    measure_bandwidth: bool = False
    """Set decode speed against the bandwidth devices.detect() measures on this host, not the device profile's."""

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
        if self.providers is not None:
            unknown = [name for name in self.providers if name not in ort.get_all_providers()]
            if not self.providers:
                problems.append("providers=() is empty — name at least one, or pass None for the device profile's")
            elif unknown:
                problems.append(f"providers {', '.join(map(repr, unknown))} do not exist in onnxruntime — "
                                f"available here: {', '.join(ort.get_available_providers())}")
            elif len(set(self.providers)) < len(self.providers):
                problems.append(f"providers={list(self.providers)} names one twice — list each once")
        if problems:
            raise ProfileError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class _Sweep:
    """What every configuration of one profile() call shares."""

    settings: ProfileSettings
    device_path: str
    """The device profile's .toml, so that every export loads with the same profile whatever it was made for."""
    bandwidth_gbs: float
    bandwidth_source: str
    trace_dir: Path | None


def profile(export_dirs: str | Path | Sequence[str | Path], settings: ProfileSettings,
            trace_dir: str | Path | None = None) -> dict:
    """Measure every configuration of the sweep over one export dir or several; the report as a dict.

    With settings.trace, raw traces are written to trace_dir (None: a new temporary dir) and kept there.
    """
    dirs = [export_dirs] if isinstance(export_dirs, (str, Path)) else list(export_dirs)
    if not dirs:
        raise ProfileError("no export dir given — pass one or more dirs written by edge-lora export")
    # Verified once here, so that the digest in the report stands for the files measured; each configuration
    # then loads without hashing again, and load_s is the session build alone.
    exports = [open_export(path, verify=True) for path in dirs]
    for export in exports:
        context = export.manifest["kv_cache"]["context_length"]
        for prompt_len in settings.prompt_lens:
            if prompt_len + settings.new_tokens > context:
                raise ProfileError(
                    f"{export.path}: prompt_len {prompt_len} + new_tokens {settings.new_tokens} exceeds the context "
                    f"of {context} tokens — use shorter prompt lengths or fewer new tokens"
                )
    device_profile = runtime.device_profile(exports[0], settings.device)
    host = dataclasses.asdict(devices.detect(ort.get_available_providers())) | {"onnxruntime": ort.__version__}
    if settings.measure_bandwidth:
        bandwidth = host["measured_bandwidth_gbs"], MEASURED_BANDWIDTH_SOURCE
    else:
        bandwidth = device_profile.bandwidth_gbs, f"device profile {device_profile.name}: {device_profile.bandwidth_source}"
    if settings.trace:
        trace_dir = Path(trace_dir) if trace_dir is not None else Path(tempfile.mkdtemp(prefix="edge-lora-trace-"))
        trace_dir.mkdir(parents=True, exist_ok=True)
    sweep = _Sweep(settings, str(device_profile.path), *bandwidth, trace_dir if settings.trace else None)
    # 0 resolved as the runtime would, so that rows record the count used; a count given twice is measured once.
    cores = psutil.cpu_count(logical=False) or 1
    thread_counts = list(dict.fromkeys(t or devices.resolve_threads(device_profile, cores) for t in settings.threads))

    described = [_describe(export) | {"flavor": export.manifest["flavor"], "model_bytes": _model_bytes(export)}
                 for export in exports]
    configurations = []
    for export, description in zip(exports, described):
        for provider in settings.providers or (None,):
            for threads in thread_counts:
                for prompt_len in settings.prompt_lens:
                    configurations.append(_configuration(sweep, export, description["model_bytes"], provider,
                                                         threads, prompt_len, index=len(configurations)))
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": host,
        "device_profile": device_profile.to_dict(),
        "exports": described,
        "settings": dataclasses.asdict(settings),
        "configurations": configurations,
    }


def _describe(export: ExportDir) -> dict:
    return {"path": str(export.path.resolve()), "precision": export.manifest["precision"], "digest": export.digest()}


def _model_bytes(export: ExportDir) -> int:
    return sum((export.path / name).stat().st_size
               for name in export.manifest["files"] if name.endswith(MODEL_FILE_SUFFIXES))


def _configuration(sweep: _Sweep, export: ExportDir, model_bytes: int, provider: str | None, threads: int,
                   prompt_len: int, index: int) -> dict:
    """One row of the report: measured ("ok"), or "unavailable" when this host lacks the provider."""
    row = {"status": "ok", "reason": None, "export": _describe(export), "provider": provider, "session_providers": [],
           "threads": threads, "prompt_len": prompt_len, "new_tokens": sweep.settings.new_tokens,
           "samples": [], "summary": None, "trace": None}
    available = ort.get_available_providers()
    if provider is not None and provider not in available:
        return row | {"status": "unavailable",
                      "reason": f"{provider} is not in this onnxruntime {ort.__version__} build; "
                                f"available here: {', '.join(available)}"}
    providers = None if provider is None else [provider]
    start = time.perf_counter_ns()
    generator = runtime.load(export.path, providers=providers, device=sweep.device_path, threads=threads, verify=False)
    load_s = (time.perf_counter_ns() - start) / 1e9
    session_providers = generator.session.get_providers()
    # Without a provider asked for, the row names the one the device profile's list put first here.
    row |= {"provider": provider or session_providers[0], "session_providers": session_providers}
    samples, peak_rss = _timed_runs(generator, sweep.settings, prompt_len)
    row["samples"] = samples
    row["summary"] = summarize(samples, prompt_len, sweep.settings.new_tokens, load_s, peak_rss, model_bytes,
                               sweep.bandwidth_gbs, sweep.bandwidth_source)
    if sweep.trace_dir is not None:
        del generator  # freed before the traced session is built: one model in memory at a time
        name = f"trace-{index:02d}-{export.manifest['precision']}-{short(row['provider'])}-t{threads}-p{prompt_len}"
        row["trace"] = _trace(sweep, export, providers, threads, prompt_len, sweep.trace_dir / name)
    return row


def _prompt(vocab_size: int, prompt_len: int) -> list[int]:
    # Latency does not depend on which tokens the prompt holds, only on how many: random ids, seeded so that
    # every configuration and every run of the profiler sees the same prompt.
    return np.random.default_rng(PROMPT_SEED).integers(FIRST_PROMPT_ID, vocab_size, prompt_len).tolist()


def _timed_runs(generator: runtime.Generator, settings: ProfileSettings, prompt_len: int) -> tuple[list[dict], int]:
    """Warm up, then time generations until both minimums are met: the raw samples and the peak RSS in bytes."""
    process = psutil.Process()
    # onnxruntime's CPU arena keeps what a run allocated, so the RSS after load and after each run tracks the
    # peak of the process (Python and onnxruntime together) without a sampling thread disturbing the timings.
    peak_rss = process.memory_info().rss
    prompt = _prompt(generator.export.manifest["vocab_size"], prompt_len)
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
    return samples, peak_rss


def _trace(sweep: _Sweep, export: ExportDir, providers: list[str] | None, threads: int, prompt_len: int,
           prefix: Path) -> dict:
    """Warm up a profiling session, trace one generation, and summarise the trace kept at prefix + ".json"."""
    generator = runtime.load(export.path, providers=providers, device=sweep.device_path, threads=threads,
                             verify=False, profile_file_prefix=str(prefix))
    prompt = _prompt(export.manifest["vocab_size"], prompt_len)
    sampling = SamplingConfig(max_new_tokens=sweep.settings.new_tokens, ignore_eos=True)
    for _ in range(sweep.settings.warmup_runs + 1):
        generator.generate(prompt, sampling)
    # onnxruntime names the file prefix_<date>_<time>.json; a name without the clock lets a rerun replace it.
    path = Path(generator.session.end_profiling()).replace(prefix.with_name(prefix.name + ".json"))
    # A generation is new_tokens session runs: prefill, then one per later token. The warm-up runs are dropped.
    return summarize_trace(path, last_runs=sweep.settings.new_tokens)


def summarize(samples: list[dict], prompt_len: int, new_tokens: int, load_s: float, peak_rss_bytes: int,
              model_bytes: int, bandwidth_gbs: float, bandwidth_source: str) -> dict:
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
        "bandwidth_source": bandwidth_source,
        "bound_tokens_s": bound_tokens_s,
        "decode_fraction_of_bound": decode_tokens_s / bound_tokens_s,
    }


def _percentiles(values: np.ndarray) -> dict[int, float]:
    return {p: float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES, method="linear"))}
