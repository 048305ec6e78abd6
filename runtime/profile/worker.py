"""One profile configuration measured in a process of its own: `python -m edge_lora.runtime.profile.worker`.

The profiler (edge_lora.runtime.profile.sweep) starts one such process per configuration, so that the process's peak
resident set size belongs to that configuration alone: in one process, the peak of the first configuration would
mask every later one, and memory a freed session leaves with the allocator would be counted against the next. The
job comes in as JSON on stdin; the raw measurements go out as JSON on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from edge_lora import runtime
from edge_lora.runtime.generate import SamplingConfig
from edge_lora.runtime.profile.trace import summarize_trace

# Ids from 3 up skip the ids tokenizers most often reserve for padding, BOS and EOS.
FIRST_PROMPT_ID = 3
PROMPT_SEED = 0
# Errors of the runtime that mean the export or the request was wrong; the profiler raises them again by name.
BAD_INPUT = (runtime.ExportError, runtime.ProviderError, runtime.PromptError)


def measure(job: dict) -> dict:
    """Load the export, warm up, time generations until both minimums are met, then optionally trace one.

    job: export (dir), provider (None: the device profile's list), device (.toml path), threads, prompt_len,
    adapter (None: the base model), new_tokens, warmup_runs, min_runs, min_seconds, trace_prefix (None: no trace).
    """
    providers = None if job["provider"] is None else [job["provider"]]
    rss_before_load = psutil.Process().memory_info().rss
    start = time.perf_counter_ns()
    generator = runtime.load(
        job["export"], providers=providers, device=job["device"], threads=job["threads"], verify=False
    ).with_adapter(job["adapter"])
    load_s = (time.perf_counter_ns() - start) / 1e9
    session_providers = generator.session.get_providers()
    model_file = generator.export.graph_file(generator.kernel)
    samples = timed_runs(generator, job)
    peak_rss = peak_rss_bytes()  # before the trace, whose session is not part of this configuration
    trace = None
    if job["trace_prefix"] is not None:
        del generator  # freed before the traced session is built: one model in memory at a time
        trace = traced_run(job, providers, Path(job["trace_prefix"]))
    return {
        "load_s": load_s,
        "model_file": model_file,
        "session_providers": session_providers,
        "samples": samples,
        "rss_before_load_bytes": rss_before_load,
        "peak_rss_bytes": peak_rss,
        "trace": trace,
    }


def prompt_ids(vocab_size: int, prompt_len: int) -> list[int]:
    # Latency does not depend on which tokens the prompt holds, only on how many: random ids, seeded so that
    # every configuration and every run of the profiler sees the same prompt.
    return np.random.default_rng(PROMPT_SEED).integers(FIRST_PROMPT_ID, vocab_size, prompt_len).tolist()


def workload(generator: runtime.Generator, job: dict) -> tuple[list[int], SamplingConfig]:
    """The prompt and sampling of every run of a job: prompt_len ids, then new_tokens past any end-of-sequence."""
    prompt = prompt_ids(generator.export.manifest.vocab_size, job["prompt_len"])
    return prompt, SamplingConfig(max_new_tokens=job["new_tokens"], ignore_eos=True)


def timed_runs(generator: runtime.Generator, job: dict) -> list[dict]:
    """Warm up, then time generations until both minimums are met: the raw samples."""
    prompt, sampling = workload(generator, job)
    for _ in range(job["warmup_runs"]):
        generator.generate(prompt, sampling)
    samples = []
    measured_s = 0.0
    while len(samples) < job["min_runs"] or measured_s < job["min_seconds"]:
        start = time.perf_counter_ns()
        generation = generator.generate(prompt, sampling)
        # End to end as the caller sees it: ttft + decode plus tokenizing and detokenizing.
        e2e_s = (time.perf_counter_ns() - start) / 1e9
        samples.append(
            {
                "ttft_s": generation.ttft_s,
                "decode_s": sum(generation.token_times_s),
                "e2e_s": e2e_s,
                "token_times_s": generation.token_times_s,
            }
        )
        measured_s += e2e_s
    return samples


def traced_run(job: dict, providers: list[str] | None, prefix: Path) -> dict:
    """Warm up a profiling session, trace one generation, and summarise the trace kept at prefix + ".json"."""
    generator = runtime.load(
        job["export"],
        providers=providers,
        device=job["device"],
        threads=job["threads"],
        verify=False,
        profile_file_prefix=str(prefix),
    ).with_adapter(job["adapter"])
    prompt, sampling = workload(generator, job)
    for _ in range(job["warmup_runs"] + 1):
        generator.generate(prompt, sampling)
    # onnxruntime names the file prefix_<date>_<time>.json; a name without the clock lets a rerun replace it.
    path = Path(generator.session.end_profiling()).replace(prefix.with_name(prefix.name + ".json"))
    # A generation is new_tokens session runs: prefill, then one per later token. The warm-up runs are dropped.
    return summarize_trace(path, last_runs=job["new_tokens"])


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    if sys.platform.startswith("linux"):
        # VmHWM, the high-water mark of this process's own address space, not getrusage's ru_maxrss: Linux
        # carries ru_maxrss over from the parent through fork and exec, so a worker would report its parent's peak.
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the line reads "VmHWM:   123456 kB"
    if sys.platform == "win32":  # no getrusage on Windows; the peak working set is its counterpart
        return psutil.Process().memory_info().peak_wset
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS (KiB on the BSDs: not handled)


def main() -> None:
    job = json.loads(sys.stdin.read())
    try:
        result = measure(job)
    except BAD_INPUT as err:
        result = {"error": {"type": type(err).__name__, "message": str(err)}}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
