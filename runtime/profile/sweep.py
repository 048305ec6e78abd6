"""Latency profile of one or more exports, single-stream (one request at a time, as MLPerf's single-stream scenario).

A sweep runs every export (one per precision, say) × adapter (none, and each of an `adapters` export's) × execution
provider × thread count × prompt length. Each configuration is measured in a process of its own
(edge_lora.runtime.profile.worker), so that its peak RSS is its own: build a session, warm it up, then time whole
generations until both a minimum number of runs and a minimum measured time are reached. Every raw sample is kept
next to the summary, and decode speed is set against the memory-bandwidth bound (DESIGN.md: measuring). A provider
this host lacks gives an "unavailable" row. Reports are written by edge_lora.runtime.profile.report and compared by
edge_lora.runtime.profile.compare.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil

from edge_lora import devices, runtime
from edge_lora.runtime.package import ExportDir, open_export
from edge_lora.runtime.profile.report import short

SCHEMA = "edge-lora/profile"
SCHEMA_VERSION = 3
PERCENTILES = (50, 90, 99)
# Weight files of the graph: model.onnx and its external data (model.onnx.data, model.onnx_data).
MODEL_FILE_SUFFIXES = (".onnx", ".data", ".onnx_data")
MEASURED_BANDWIDTH_SOURCE = "measured on this host: best-of-5 single-thread memcpy of 256 MiB (devices.detect)"
WORKER = "edge_lora.runtime.profile.worker"
# The errors a worker reports by name (edge_lora.runtime.profile.worker.BAD_INPUT), raised here again.
WORKER_ERRORS = {cls.__name__: cls for cls in (runtime.ExportError, runtime.ProviderError, runtime.PromptError)}


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
    adapters: tuple[str, ...] | None = None
    """Adapters to sweep on each export of flavor `adapters`, besides the base model (no adapter): None takes
    every adapter the export has. Exports of flavor `merged` are measured as they are."""
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
        if self.adapters is not None and (not self.adapters or len(set(self.adapters)) < len(self.adapters)):
            problems.append(f"adapters={list(self.adapters)} must name one or more adapters, each once — or pass None "
                            "for every adapter of the export")
        if problems:
            raise ProfileError("; ".join(problems))


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


@dataclasses.dataclass(frozen=True)
class _Sweep:
    """What every configuration of one profile() call shares."""

    settings: ProfileSettings
    device_profile: devices.DeviceProfile
    """Every export loads with this profile (by its .toml path), whatever it was made for."""
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
    adapters = [_adapters(export, settings.adapters) for export in exports]
    if settings.adapters is not None and not any(adapters):
        raise ProfileError(f"adapters={list(settings.adapters)} were asked for, but no export given is of flavor "
                           "adapters — profile an export made with edge-lora export --flavor adapters, or drop --adapters")
    device_profile = runtime.device_profile(exports[0], settings.device)
    host = dataclasses.asdict(devices.detect(ort.get_available_providers())) | {"onnxruntime": ort.__version__}
    # The schema requires a bandwidth in every device profile; the host's measurement replaces it on request,
    # for instance when the profile describes a device class rather than this machine.
    if settings.measure_bandwidth:
        bandwidth = host["measured_bandwidth_gbs"], MEASURED_BANDWIDTH_SOURCE
    else:
        bandwidth = device_profile.bandwidth_gbs, f"device profile {device_profile.name}: {device_profile.bandwidth_source}"
    if settings.trace:
        trace_dir = Path(trace_dir) if trace_dir is not None else Path(tempfile.mkdtemp(prefix="edge-lora-trace-"))
        trace_dir.mkdir(parents=True, exist_ok=True)
    sweep = _Sweep(settings, device_profile, *bandwidth, trace_dir if settings.trace else None)
    # 0 resolved as the runtime would, so that rows record the count used; a count given twice is measured once.
    cores = psutil.cpu_count(logical=False) or 1
    thread_counts = list(dict.fromkeys(t or devices.resolve_threads(device_profile, cores) for t in settings.threads))

    described = [_describe_fully(export, names) for export, names in zip(exports, adapters)]
    configurations = []
    for export, description, names in zip(exports, described, adapters):
        for adapter in (None, *names):
            for provider in settings.providers or (None,):
                for threads in thread_counts:
                    for prompt_len in settings.prompt_lens:
                        configurations.append(_configuration(sweep, export, description, adapter, provider, threads,
                                                             prompt_len, index=len(configurations)))
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


def _adapters(export: ExportDir, asked: tuple[str, ...] | None) -> list[str]:
    """The adapters to sweep on this export: none for a merged one, else those asked for (all by default)."""
    if export.manifest["flavor"] != "adapters":
        return []
    known = sorted(export.manifest.get("adapters", {}))
    missing = [name for name in asked or () if name not in known]
    if missing:
        raise ProfileError(f"{export.path} has no adapter {', '.join(map(repr, missing))} — its adapters: "
                           f"{', '.join(known) or 'none'}")
    return list(asked) if asked is not None else known


def _describe(export: ExportDir) -> dict:
    return {"path": str(export.path.resolve()), "precision": export.manifest["precision"], "digest": export.digest()}


def _describe_fully(export: ExportDir, adapters: list[str]) -> dict:
    """The export as the report lists it: what _describe says, plus its flavor and byte counts — of the portable
    graph, and under "kernel_graphs" of each graph an edge-lora kernel runs (the one a row ran is its model_file)."""
    kernel_graphs = {kernel: _graph_bytes(export, entry, {name: entry["adapters"][name]["file"] for name in adapters},
                                          entry.get("data_files", ()))
                     for kernel, entry in export.manifest.get("kernels", {}).items()}
    portable = _graph_bytes(export, export.manifest,
                            {name: export.manifest["adapters"][name]["file"] for name in adapters})
    return _describe(export) | {"flavor": export.manifest["flavor"], **portable, "kernel_graphs": kernel_graphs}


def _graph_bytes(export: ExportDir, entry: dict, adapter_files: dict[str, str], data_files=()) -> dict:
    """One graph's files (the graph and its external data: its own, and `data_files` it shares with another
    graph), weights and per-token reads (as `entry`, its part of export.json, records them; None where it does
    not), and its adapters'."""
    model_file = entry["model_file"]
    adapter_bytes = {}
    for name, file in adapter_files.items():
        # Read with onnxruntime's own reader of its adapter format: every tensor of it is fed to the graph.
        parameters = ort.AdapterFormat.read_adapter(str(export.path / file))
        adapter_bytes[name] = sum(value.tensor_size_in_bytes() for value in parameters.get_parameters().values())
    return {
        "model_file": model_file,
        "model_bytes": sum((export.path / name).stat().st_size for name in export.manifest["files"]
                           if (name.startswith(model_file) and name.endswith(MODEL_FILE_SUFFIXES)) or name in data_files),
        "weight_bytes": entry.get("weight_bytes"),
        "weight_bytes_per_token": entry.get("weight_bytes_per_token"),
        "adapter_bytes": adapter_bytes,
    }


def kv_cache_bytes_per_token(export: ExportDir, prompt_len: int, new_tokens: int) -> int:
    """Past KV cache bytes a decode step reads, averaged over the new_tokens - 1 decode steps of one run."""
    kv = export.manifest["kv_cache"]
    itemsize = 2 if export.manifest["precision"] == "fp16" else 4  # the cache's dtype, as the Generator feeds it
    per_position = kv["num_layers"] * 2 * kv["num_kv_heads"] * kv["head_dim"] * itemsize  # keys and values
    # Decode step k (1 .. new_tokens - 1) reads a past of prompt_len + k - 1 positions.
    mean_past = prompt_len + (new_tokens - 2) / 2
    return round(per_position * mean_past)


def _configuration(sweep: _Sweep, export: ExportDir, description: dict, adapter: str | None, provider: str | None,
                   threads: int, prompt_len: int, index: int) -> dict:
    """One row of the report: measured ("ok"), or "unavailable" when this host lacks the provider."""
    settings = sweep.settings
    available = ort.get_available_providers()
    # Without a provider asked for, the row names the first of the device profile's list this host has, the one
    # the session puts first (choose_providers; the CPU provider where none is).
    shown = provider or next((p.name for p in sweep.device_profile.providers if p.name in available),
                             "CPUExecutionProvider")
    row = {"status": "ok", "reason": None, "export": _describe(export), "model_file": None, "adapter": adapter,
           "provider": shown, "session_providers": [], "threads": threads, "prompt_len": prompt_len,
           "new_tokens": settings.new_tokens, "samples": [], "summary": None, "trace": None}
    if provider is not None and provider not in available:
        return row | {"status": "unavailable",
                      "reason": f"{provider} is not in this onnxruntime {ort.__version__} build; "
                                f"available here: {', '.join(available)}"}
    trace_prefix = None
    if sweep.trace_dir is not None:
        name = f"trace-{index:02d}-{export.manifest['precision']}-{short(shown)}-t{threads}-p{prompt_len}"
        trace_prefix = str(sweep.trace_dir / (name + (f"-{adapter}" if adapter else "")))
    result = _run_worker({
        "export": str(export.path), "provider": provider, "device": str(sweep.device_profile.path),
        "threads": threads, "prompt_len": prompt_len, "adapter": adapter, "new_tokens": settings.new_tokens,
        "warmup_runs": settings.warmup_runs, "min_runs": settings.min_runs, "min_seconds": settings.min_seconds,
        "trace_prefix": trace_prefix,
    })
    graph = next((g for g in description["kernel_graphs"].values() if g["model_file"] == result["model_file"]),
                 description)  # the graph the worker's session ran
    facts = Facts(
        load_s=result["load_s"],
        rss_before_load_mb=result["rss_before_load_bytes"] / 2**20,
        peak_rss_mb=result["peak_rss_bytes"] / 2**20,
        model_bytes=graph["model_bytes"],
        weight_bytes_per_token=graph["weight_bytes_per_token"],
        adapter_bytes_per_token=graph["adapter_bytes"].get(adapter, 0),
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(export, prompt_len, settings.new_tokens),
        bandwidth_gbs=sweep.bandwidth_gbs,
        bandwidth_source=sweep.bandwidth_source,
    )
    return row | {"model_file": result["model_file"], "session_providers": result["session_providers"],
                  "samples": result["samples"],
                  "summary": summarize(result["samples"], prompt_len, settings.new_tokens, facts),
                  "trace": result["trace"]}


def _run_worker(job: dict) -> dict:
    """Measure one configuration in a fresh Python process (edge_lora.runtime.profile.worker); its result."""
    done = subprocess.run([sys.executable, "-m", WORKER], input=json.dumps(job), capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the profile worker for {job['export']} ({job}) exited with status {done.returncode}: "
                           f"{done.stderr.strip()[-2000:]}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise WORKER_ERRORS[result["error"]["type"]](result["error"]["message"])
    return result


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
    log_pmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
               + (k * math.log(q) if k else 0.0) + ((n - k) * math.log1p(-q) if n - k else 0.0) for k in range(n + 1)]
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
