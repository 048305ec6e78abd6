"""What an export starts from, checked before anything is built: the adapter dirs (distinct names, readable
finite weights, one base and quantization between them), the output path, the base model dir, and the graph
writer for its architecture."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from edge_lora.errors import UsageError
from edge_lora.export.graphs import builder as builder_graph
from edge_lora.export.graphs import portable as portable_graph
from edge_lora.export.options import ExportOptions, auto_graph
from edge_lora.formats import ADAPTER_WEIGHTS, AdapterManifest
from edge_lora.train import manifest as adapter_manifest
from edge_lora.train.reference import base_dir_of


@dataclass(frozen=True)
class ExportInputs:
    """The checked inputs of one export."""

    dirs: list[Path]
    """The adapter dirs, in the order given; the first one's tokenizer and eval set serve the whole export."""
    names: list[str]
    """Each adapter's name: its dir's name."""
    manifests: list[AdapterManifest]
    """Each adapter's edge_lora.json."""
    model_dir: Path
    """The base model the adapters were trained on."""
    options: ExportOptions
    """The options asked for, with graph "auto" resolved to the writer that takes this architecture."""


def resolve_inputs(
    adapter_dirs: str | Path | list,
    output: str | Path,
    options: ExportOptions,
    base: str | None,
    force: bool,
    overwrite: bool,
) -> ExportInputs:
    """The export's inputs, or UsageError with one line naming the first problem and its fix."""
    dirs = [Path(d) for d in (adapter_dirs if isinstance(adapter_dirs, (list, tuple)) else [adapter_dirs])]
    if options.flavor == "merged" and len(dirs) != 1:
        raise UsageError(f"flavor merged takes one adapter dir, got {len(dirs)} — pass one, or --flavor adapters")
    names = [d.resolve().name for d in dirs]
    if len(set(names)) != len(names):
        raise UsageError(f"adapter dirs must have distinct names (they name the adapters): {', '.join(map(str, dirs))}")
    manifests = [adapter_manifest.read(d) for d in dirs]
    for d in dirs:
        check_adapter_weights(d)
    if Path(output).exists() and not overwrite:
        raise UsageError(f"output {output} already exists — choose another --output or pass --overwrite")
    model_dir = base_dir_of(dirs[0], manifests[0], base, force)
    options = graph_options(model_dir, options)
    check_same_base(dirs, manifests)
    return ExportInputs(dirs=dirs, names=names, manifests=manifests, model_dir=model_dir, options=options)


def check_adapter_weights(adapter_dir: Path) -> None:
    """A readable adapter_model.safetensors with finite tensors, or one line that says which file is broken."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = adapter_dir / ADAPTER_WEIGHTS
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UsageError(
            f"{path} cannot be read ({e}) — the file is missing or corrupt; restore it or train again"
        ) from None
    broken = [name for name, t in tensors.items() if not t.isfinite().all()]
    if broken:
        raise UsageError(f"{path}: tensor {broken[0]} holds NaN or inf — the adapter is broken; train again")


def graph_options(model_dir: Path, options: ExportOptions) -> ExportOptions:
    """`options` with graph "auto" resolved for the base's architecture, which the chosen writer must take."""
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if options.graph == "auto":
        options = replace(options, graph=auto_graph(model_type, options))
    if options.graph == "builder":
        builder_graph.check_supported(model_type, model_dir)
    elif model_type not in portable_graph.MODEL_TYPES:
        raise UsageError(
            f"{model_dir}: architecture {model_type!r} cannot be exported with a KV cache — "
            f"supported: {', '.join(portable_graph.MODEL_TYPES)}"
        )
    return options


def check_same_base(dirs: list[Path], manifests: list[AdapterManifest]) -> None:
    """Adapters that share one base graph come from one base model and one quantization."""
    first = manifests[0]
    for d, m in zip(dirs[1:], manifests[1:]):
        if m.base_digest != first.base_digest or m.training["quant"] != first.training["quant"]:
            raise UsageError(
                f"{d} was trained on another base or quantization than {dirs[0]} — adapters that share "
                "one base graph must come from the same base and quant settings"
            )
