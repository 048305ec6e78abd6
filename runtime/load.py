"""Open an export for generation: its device profile, execution providers, threads, and the fastest graph it
carries that this host runs (edge-lora's own kernels where they build, else the portable graph)."""

from __future__ import annotations

import warnings
from pathlib import Path

from edge_lora.formats import DEFAULT_DEVICE, ExportManifest
from edge_lora.runtime.generate import Generator
from edge_lora.runtime.package import ExportDir, ExportError, open_export
from edge_lora.runtime.session import choose_providers, make_session
from edge_lora.runtime.tokenizer import TextTokenizer


def load(
    export_dir: str | Path,
    providers: list[str] | None = None,
    device: str | None = None,
    threads: int | None = None,
    strict_providers: bool = False,
    verify: bool = True,
    profile_file_prefix: str | None = None,
    kernels: tuple[str, ...] | list[str] | None = None,
) -> Generator:
    """Open an export for generation.

    Providers come from `providers` if given, else from the device profile (`device`, or the one the export
    was made for, or cpu-x86-64); threads likewise (0 means one per physical core); edge-lora's own kernels
    likewise (`kernels`, () for none): where the export carries a graph for one and it builds on this host, that
    graph runs (`Generator.kernel` names it), else the portable one. With `profile_file_prefix`, onnxruntime
    traces the session into a JSON file whose path starts with it (see make_session).
    """
    export = open_export(export_dir, verify=False)  # verified below, once the graph to open is known
    profile = device_profile(export, device)
    chosen, threads = providers_and_threads(profile, providers, threads, strict_providers)
    allowed = profile.kernels if kernels is None else tuple(kernels)
    if chosen[0][0] != "CPUExecutionProvider":
        allowed = ()  # the kernels are CPU ops: beside an accelerator's nodes they would only add copies
    kernel, library = choose_kernel(export, allowed)
    if verify:
        export.verify(kernel)
    session = open_session(export, kernel, library, chosen, threads, profile, profile_file_prefix)
    generator = Generator(export, session, read_tokenizer(export), load_adapters(export, kernel))
    generator.kernel = kernel
    return generator


def providers_and_threads(profile, providers: list[str] | None, threads: int | None, strict: bool):
    """The execution providers to ask for, with their options (`providers` if given, else the device profile's),
    and the intra-op threads (`threads` if given, else the profile's; 0 means one per physical core)."""
    import psutil

    from edge_lora import devices

    if providers is not None:
        requested = [(name, {}) for name in providers]
    else:
        requested = [(p.name, dict(p.options)) for p in profile.providers]
    if threads is None:
        threads = devices.resolve_threads(profile, psutil.cpu_count(logical=False) or 1)
    return choose_providers(requested, strict=strict), threads


def open_session(
    export: ExportDir,
    kernel: str | None,
    library: Path | None,
    chosen,
    threads: int,
    profile,
    profile_file_prefix: str | None,
):
    """The onnxruntime session of `kernel`'s graph (None: the portable graph); ExportError when onnxruntime cannot
    load the file."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    # what onnxruntime raises for a model file it cannot load: truncated, empty, not ONNX, gone
    unloadable = (
        ort_state.InvalidProtobuf,
        ort_state.InvalidArgument,
        ort_state.InvalidGraph,
        ort_state.NoSuchFile,
        ort_state.NoModel,
        ort_state.Fail,
    )
    model_path = export.path / export.graph_file(kernel)
    try:
        # An `adapters` export's LoRA inputs and a builder graph's logits_start are overridable initializers, about
        # which onnxruntime warns once each at load (they are not constants, by design): only errors are logged.
        return make_session(
            model_path,
            chosen,
            threads=threads,
            graph_optimization=profile.graph_optimization,
            profile_file_prefix=profile_file_prefix,
            log_severity=3 if has_overridable_initializers(export.manifest) else 2,
            custom_ops_library=library,
        )
    except unloadable as e:
        raise ExportError(
            f"{model_path} cannot be loaded by onnxruntime ({first_line(e)}) — the file is "
            "missing or corrupt; re-run edge-lora export"
        ) from None


def read_tokenizer(export: ExportDir) -> TextTokenizer:
    try:
        return TextTokenizer(export.tokenizer_path)
    except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
        raise ExportError(
            f"{export.tokenizer_path} cannot be read by tokenizers ({first_line(e)}) — the file is "
            "missing or corrupt; re-run edge-lora export"
        ) from None


def choose_kernel(export: ExportDir, allowed: tuple[str, ...]) -> tuple[str | None, Path | None]:
    """(kernel, its library) for the first kernel graph the export carries that `allowed` names and this host
    builds; (None, None) for the portable graph. A host whose CPU could run a kernel but cannot build it (no
    compiler, a failed build), and a kernel graph in a format this runtime's kernel does not take (an older
    export), get one warning that says why and which graph runs instead: it is running slower than it could."""
    from edge_lora.runtime import kernels as own_kernels

    passed_over: list[tuple[str, str]] = []  # why each graph before the chosen one does not run, and what to do
    chosen: tuple[str | None, Path | None] = (None, None)
    for kernel, entry in export.manifest.kernels.items():
        if kernel not in allowed:
            continue
        if entry.format != own_kernels.FORMATS.get(kernel):
            passed_over.append(
                (
                    f"{entry.model_file} is in {kernel} format {entry.format}, this runtime's "
                    f"kernel takes format {own_kernels.FORMATS.get(kernel)}",
                    " — re-run edge-lora export to use the kernel",
                )
            )
            continue
        try:
            chosen = kernel, own_kernels.library(kernel)
            break
        except own_kernels.KernelUnavailable as e:
            if own_kernels.cpu_problem(kernel) is None:
                passed_over.append((f"edge-lora's {kernel} kernel is not available ({e})", ""))
    for why, fix in passed_over:
        warnings.warn(f"{why}: running {export.graph_file(chosen[0])} instead{fix}", stacklevel=3)
    return chosen


def has_overridable_initializers(manifest: ExportManifest) -> bool:
    return manifest.flavor == "adapters" or manifest.graph == "builder"


def first_line(error: Exception, limit: int = 200) -> str:
    """The first line of an error's message, at most `limit` characters (its type's name when it has none): a
    library's multi-line message, shown inside one line of ours."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def load_adapters(export: ExportDir, kernel: str | None = None) -> dict:
    """Every adapter of an `adapters` export, loaded once: {name: lora.Adapter}; with `kernel`, the files in the
    form that kernel's graph takes."""
    from edge_lora.runtime.lora import Adapter

    entries = export.manifest.graph_entry(kernel).adapters
    return {name: Adapter(export.path / entry.file, form=kernel) for name, entry in entries.items()}


def device_profile(export: ExportDir, device: str | None = None):
    """The profile named by `device`, else the one the export was made for, else the x86-64 CPU one."""
    from edge_lora import devices

    return devices.load(device or export.manifest.device or DEFAULT_DEVICE)
