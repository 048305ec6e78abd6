"""onnxruntime sessions: execution providers in priority order, threads and graph optimisation level."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnxruntime as ort

GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ProviderError(ValueError):
    """An execution provider that was asked for cannot be used here."""


def choose_providers(requested: list[tuple[str, dict]], strict: bool = False) -> list[tuple[str, dict]]:
    """Keep the requested providers this onnxruntime build has, in order; warn once for each one dropped.

    CPUExecutionProvider is always appended last, as onnxruntime itself does: every graph runs there.
    """
    available = ort.get_available_providers()
    known = ort.get_all_providers()
    chosen = []
    for name, options in requested:
        if name not in known:
            raise ProviderError(f"execution provider {name!r} does not exist — available here: {', '.join(available)}")
        if name in available:
            chosen.append((name, options))
        elif strict:
            raise ProviderError(
                f"execution provider {name} is not available in this onnxruntime build — available: "
                f"{', '.join(available)}"
            )
        else:
            warnings.warn(
                f"execution provider {name} is not available here; falling back to the next one", stacklevel=3
            )
    if not any(name == "CPUExecutionProvider" for name, _ in chosen):
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


def make_session(
    model_path: Path,
    providers: list[tuple[str, dict]],
    threads: int = 0,
    graph_optimization: str = "all",
    profile_file_prefix: str | None = None,
    log_severity: int = 2,
    custom_ops_library: Path | None = None,
) -> ort.InferenceSession:
    """With `profile_file_prefix`, onnxruntime traces every node run into a JSON file whose path starts with it;
    session.end_profiling() closes the file and returns its path. `custom_ops_library`: a library of custom ops
    the graph uses (edge_lora.runtime.kernels)."""
    options = ort.SessionOptions()
    if custom_ops_library is not None:
        options.register_custom_ops_library(str(custom_ops_library))
    options.log_severity_level = log_severity  # 2: warnings and errors, 3: errors only
    if profile_file_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_file_prefix
    options.graph_optimization_level = GRAPH_LEVELS[graph_optimization]
    options.intra_op_num_threads = threads  # 0 lets onnxruntime use one thread per physical core
    options.inter_op_num_threads = 1  # a decoder graph is a chain: no independent branches to run in parallel
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(
        str(model_path),
        sess_options=options,
        providers=[name for name, _ in providers],
        provider_options=[opts for _, opts in providers],
    )
