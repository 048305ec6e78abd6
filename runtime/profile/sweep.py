"""Latency profile of one or more exports, single-stream (one request at a time, as MLPerf's single-stream scenario).

A sweep runs every export (one per precision, say) × adapter (none, and each of an `adapters` export's) × execution
provider × thread count × prompt length. Each configuration is measured in a process of its own
(edge_lora.runtime.profile.worker), so that its peak RSS is its own: build a session, warm it up, then time whole
generations until both a minimum number of runs and a minimum measured time are reached. Every raw sample is kept
next to the summary, and decode speed is set against the memory-bandwidth bound, so that a figure says how far it
is from what the memory allows. A provider this host lacks gives an "unavailable" row. Reports are written by
edge_lora.runtime.profile.report and compared by edge_lora.runtime.profile.compare.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil

from edge_lora import devices, runtime
from edge_lora.formats import PROFILE_SCHEMA, PROFILE_SCHEMA_VERSION, ProfileError, ProfileReport
from edge_lora.runtime.generate import cache_dtype
from edge_lora.runtime.package import ExportDir, open_export
from edge_lora.runtime.profile.report import short
from edge_lora.runtime.profile.summary import Facts, summarize
from edge_lora.runtime.profile.worker import BAD_INPUT

# Weight files of the graph: model.onnx and its external data (model.onnx.data, model.onnx_data).
MODEL_FILE_SUFFIXES = (".onnx", ".data", ".onnx_data")
MEASURED_BANDWIDTH_SOURCE = "measured on this host: best-of-5 single-thread memcpy of 256 MiB (devices.detect)"
WORKER = "edge_lora.runtime.profile.worker"
# The errors a worker reports by name, raised here again.
WORKER_ERRORS = {cls.__name__: cls for cls in BAD_INPUT}


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
            problems.append(
                f"new_tokens={self.new_tokens} must be >= 2: the first token comes with prefill, "
                "decode speed needs at least one more"
            )
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
                problems.append(
                    f"providers {', '.join(map(repr, unknown))} do not exist in onnxruntime — "
                    f"available here: {', '.join(ort.get_available_providers())}"
                )
            elif len(set(self.providers)) < len(self.providers):
                problems.append(f"providers={list(self.providers)} names one twice — list each once")
        if self.adapters is not None and (not self.adapters or len(set(self.adapters)) < len(self.adapters)):
            problems.append(
                f"adapters={list(self.adapters)} must name one or more adapters, each once — or pass "
                "None for every adapter of the export"
            )
        if problems:
            raise ProfileError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class _Sweep:
    """What every configuration of one profile() call shares."""

    settings: ProfileSettings
    device_profile: devices.DeviceProfile
    """Every export loads with this profile (by its .toml path), whatever it was made for."""
    bandwidth_gbs: float
    bandwidth_source: str
    trace_dir: Path | None


def profile(
    export_dirs: str | Path | Sequence[str | Path], settings: ProfileSettings, trace_dir: str | Path | None = None
) -> ProfileReport:
    """Measure every configuration of the sweep over one export dir or several.

    With settings.trace, raw traces are written to trace_dir (None: a new temporary dir) and kept there.
    """
    exports = _open_exports(export_dirs, settings)
    adapters = [_adapters(export, settings.adapters) for export in exports]
    if settings.adapters is not None and not any(adapters):
        raise ProfileError(
            f"adapters={list(settings.adapters)} were asked for, but no export given is of flavor "
            "adapters — profile an export made with edge-lora export --flavor adapters, or drop "
            "--adapters"
        )
    device_profile = runtime.device_profile(exports[0], settings.device)
    host = dataclasses.asdict(devices.detect(ort.get_available_providers())) | {"onnxruntime": ort.__version__}
    bandwidth = _bandwidth(settings, device_profile, host)
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
                        configurations.append(
                            _configuration(
                                sweep,
                                export,
                                description,
                                adapter,
                                provider,
                                threads,
                                prompt_len,
                                index=len(configurations),
                            )
                        )
    return ProfileReport(
        schema=PROFILE_SCHEMA,
        schema_version=PROFILE_SCHEMA_VERSION,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        host=host,
        device_profile=device_profile.to_dict(),
        exports=described,
        settings=dataclasses.asdict(settings),
        configurations=configurations,
    )


def _open_exports(export_dirs: str | Path | Sequence[str | Path], settings: ProfileSettings) -> list[ExportDir]:
    """The exports to sweep, each verified and checked to hold every prompt length plus new_tokens in its context.

    Verified once here, so that the digest in the report stands for the files measured; each configuration then
    loads without hashing again, and load_s is the session build alone.
    """
    dirs = [export_dirs] if isinstance(export_dirs, (str, Path)) else list(export_dirs)
    if not dirs:
        raise ProfileError("no export dir given — pass one or more dirs written by edge-lora export")
    exports = [open_export(path, verify=True) for path in dirs]
    for export in exports:
        context = export.manifest.kv_cache.context_length
        for prompt_len in settings.prompt_lens:
            if prompt_len + settings.new_tokens > context:
                raise ProfileError(
                    f"{export.path}: prompt_len {prompt_len} + new_tokens {settings.new_tokens} exceeds the context "
                    f"of {context} tokens — use shorter prompt lengths or fewer new tokens"
                )
    return exports


def _bandwidth(settings: ProfileSettings, device_profile: devices.DeviceProfile, host: dict) -> tuple[float, str]:
    """(GB/s, where it comes from) of the bandwidth bound: the device profile's, or this host's measurement.

    The schema requires a bandwidth in every device profile; the host's measurement replaces it on request, for
    instance when the profile describes a device class rather than this machine.
    """
    if settings.measure_bandwidth:
        return host["measured_bandwidth_gbs"], MEASURED_BANDWIDTH_SOURCE
    return device_profile.bandwidth_gbs, f"device profile {device_profile.name}: {device_profile.bandwidth_source}"


def _adapters(export: ExportDir, asked: tuple[str, ...] | None) -> list[str]:
    """The adapters to sweep on this export: none for a merged one, else those asked for (all by default)."""
    if export.manifest.flavor != "adapters":
        return []
    known = sorted(export.manifest.adapters)
    missing = [name for name in asked or () if name not in known]
    if missing:
        raise ProfileError(
            f"{export.path} has no adapter {', '.join(map(repr, missing))} — its adapters: {', '.join(known) or 'none'}"
        )
    return list(asked) if asked is not None else known


def _describe(export: ExportDir) -> dict:
    return {"path": str(export.path.resolve()), "precision": export.manifest.precision, "digest": export.digest()}


def _describe_fully(export: ExportDir, adapters: list[str]) -> dict:
    """The export as the report lists it: what _describe says, plus its flavor and byte counts — of the portable
    graph, and under "kernel_graphs" of each graph an edge-lora kernel runs (the one a row ran is its model_file)."""
    graphs = {kernel: _graph_bytes(export, kernel, adapters) for kernel in export.manifest.kernels}
    portable = _graph_bytes(export, None, adapters)
    return _describe(export) | {"flavor": export.manifest.flavor, **portable, "kernel_graphs": graphs}


def _graph_bytes(export: ExportDir, kernel: str | None, adapters: list[str]) -> dict:
    """The bytes of `kernel`'s graph (None: the portable graph): its files (the graph and its external data: its
    own, and the data files it shares with another graph), its weights and per-token reads (as export.json records
    them; None where it does not), and the files of its `adapters`."""
    entry = export.manifest.graph_entry(kernel)
    model_file, data_files = entry.model_file, entry.data_files
    adapter_bytes = {}
    for name in adapters:
        # Read with onnxruntime's own reader of its adapter format: every tensor of it is fed to the graph.
        parameters = ort.AdapterFormat.read_adapter(str(export.path / entry.adapters[name].file))
        adapter_bytes[name] = sum(value.tensor_size_in_bytes() for value in parameters.get_parameters().values())
    return {
        "model_file": model_file,
        "model_bytes": sum(
            (export.path / name).stat().st_size
            for name in export.manifest.files
            if (name.startswith(model_file) and name.endswith(MODEL_FILE_SUFFIXES)) or name in data_files
        ),
        "weight_bytes": entry.weight_bytes,
        "weight_bytes_per_token": entry.weight_bytes_per_token,
        "adapter_bytes": adapter_bytes,
    }


def kv_cache_bytes_per_token(export: ExportDir, prompt_len: int, new_tokens: int) -> int:
    """Past KV cache bytes a decode step reads, averaged over the new_tokens - 1 decode steps of one run."""
    kv = export.manifest.kv_cache
    itemsize = np.dtype(cache_dtype(export)).itemsize  # the cache's dtype, as the Generator feeds it
    per_position = kv.num_layers * 2 * kv.num_kv_heads * kv.head_dim * itemsize  # keys and values
    # Decode step k (1 .. new_tokens - 1) reads a past of prompt_len + k - 1 positions.
    mean_past = prompt_len + (new_tokens - 2) / 2
    return round(per_position * mean_past)


def _configuration(
    sweep: _Sweep,
    export: ExportDir,
    description: dict,
    adapter: str | None,
    provider: str | None,
    threads: int,
    prompt_len: int,
    index: int,
) -> dict:
    """One row of the report: measured ("ok"), or "unavailable" when this host lacks the provider."""
    settings = sweep.settings
    available = ort.get_available_providers()
    # Without a provider asked for, the row names the first of the device profile's list this host has, the one
    # the session puts first (choose_providers; the CPU provider where none is).
    shown = provider or next(
        (p.name for p in sweep.device_profile.providers if p.name in available), "CPUExecutionProvider"
    )
    row = _empty_row(export, adapter, shown, threads, prompt_len, settings.new_tokens)
    if provider is not None and provider not in available:
        return row | {
            "status": "unavailable",
            "reason": f"{provider} is not in this onnxruntime {ort.__version__} build; "
            f"available here: {', '.join(available)}",
        }
    trace_prefix = None
    if sweep.trace_dir is not None:
        name = f"trace-{index:02d}-{export.manifest.precision}-{short(shown)}-t{threads}-p{prompt_len}"
        trace_prefix = str(sweep.trace_dir / (name + (f"-{adapter}" if adapter else "")))
    job = {
        "export": str(export.path),
        "provider": provider,
        "device": str(sweep.device_profile.path),
        "threads": threads,
        "prompt_len": prompt_len,
        "adapter": adapter,
        "new_tokens": settings.new_tokens,
        "warmup_runs": settings.warmup_runs,
        "min_runs": settings.min_runs,
        "min_seconds": settings.min_seconds,
        "trace_prefix": trace_prefix,
    }
    result = _run_worker(job)
    facts = _facts(sweep, export, description, adapter, prompt_len, result)
    return row | {
        "model_file": result["model_file"],
        "session_providers": result["session_providers"],
        "samples": result["samples"],
        "summary": summarize(result["samples"], prompt_len, settings.new_tokens, facts),
        "trace": result["trace"],
    }


def _empty_row(
    export: ExportDir, adapter: str | None, provider: str, threads: int, prompt_len: int, new_tokens: int
) -> dict:
    """A report row before it is measured: its configuration, and "ok" with no figures yet."""
    return {
        "status": "ok",
        "reason": None,
        "export": _describe(export),
        "model_file": None,
        "adapter": adapter,
        "provider": provider,
        "session_providers": [],
        "threads": threads,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "samples": [],
        "summary": None,
        "trace": None,
    }


def _facts(
    sweep: _Sweep, export: ExportDir, description: dict, adapter: str | None, prompt_len: int, result: dict
) -> Facts:
    """What a configuration's summary records beside its timings: the worker's measurements and the bytes of the
    graph its session ran."""
    graph = next(
        (g for g in description["kernel_graphs"].values() if g["model_file"] == result["model_file"]), description
    )
    return Facts(
        load_s=result["load_s"],
        rss_before_load_mb=result["rss_before_load_bytes"] / 2**20,
        peak_rss_mb=result["peak_rss_bytes"] / 2**20,
        model_bytes=graph["model_bytes"],
        weight_bytes_per_token=graph["weight_bytes_per_token"],
        adapter_bytes_per_token=graph["adapter_bytes"].get(adapter, 0),
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(export, prompt_len, sweep.settings.new_tokens),
        bandwidth_gbs=sweep.bandwidth_gbs,
        bandwidth_source=sweep.bandwidth_source,
    )


def _run_worker(job: dict) -> dict:
    """Measure one configuration in a fresh Python process (edge_lora.runtime.profile.worker); its result."""
    done = subprocess.run([sys.executable, "-m", WORKER], input=json.dumps(job), capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"the profile worker for {job['export']} ({job}) exited with status {done.returncode}: "
            f"{done.stderr.strip()[-2000:]}"
        )
    result = json.loads(lines[-1])
    if "error" in result:
        raise WORKER_ERRORS[result["error"]["type"]](result["error"]["message"])
    return result
