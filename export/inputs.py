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
from edge_lora.export.peft_config import check_peft_adapter
from edge_lora.formats import ADAPTER_MANIFEST, ADAPTER_WEIGHTS, TOKENIZER_FILE, AdapterManifest
from edge_lora.train import manifest as adapter_manifest
from edge_lora.train.manifest import PEFT_CONFIG, TRAINED_ON
from edge_lora.train.qlora import resolve_model_dir
from edge_lora.train.reference import base_dir_of, held_in_4bit

TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json")  # a dir with either holds a tokenizer transformers loads


@dataclass(frozen=True)
class ExportInputs:
    """The checked inputs of one export."""

    dirs: list[Path]
    """The adapter dirs, in the order given; the first one's eval set (and tokenizer) serve the whole export."""
    names: list[str]
    """Each adapter's name: its dir's name."""
    manifests: list[AdapterManifest]
    """Each adapter's edge_lora.json, or the one built for a PEFT adapter without it (its `foreign` set)."""
    model_dir: Path
    """The base model the adapters were trained on."""
    options: ExportOptions
    """The options asked for, with graph "auto" resolved to the writer that takes this architecture."""
    tokenizer_dir: Path
    """The first adapter dir where it holds a tokenizer (edge-lora train saves one), else the base's."""


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
    for d in dirs:
        check_peft_adapter(d)
    manifests = read_manifests(dirs, options, base)
    for d in dirs:
        check_adapter_weights(d)
    if Path(output).exists() and not overwrite:
        raise UsageError(f"output {output} already exists — choose another --output or pass --overwrite")
    if manifests[0].foreign:
        model_dir = resolve_model_dir(manifests[0].base_model)
    else:
        model_dir = base_dir_of(dirs[0], manifests[0], base, force)
    if not held_in_4bit(manifests[0]):  # a full-precision base: there are no dequantized weights
        options = replace(options, merge_into="original")
    options = graph_options(model_dir, options)
    check_same_base(dirs, manifests)
    tokenizer_dir = dirs[0] if any((dirs[0] / f).exists() for f in TOKENIZER_FILES) else model_dir
    return ExportInputs(
        dirs=dirs, names=names, manifests=manifests, model_dir=model_dir, options=options, tokenizer_dir=tokenizer_dir
    )


def read_manifests(dirs: list[Path], options: ExportOptions, base: str | None) -> list[AdapterManifest]:
    """Each dir's edge_lora.json, or for a PEFT adapter dir without one the manifest edge-lora train would have
    written (train/manifest.py `foreign`): its base from `base` or adapter_config.json, how that base was held
    in training from options.trained_on (which must then be given, and is refused when no dir needs it)."""
    fingerprints: dict[Path, dict] = {}
    manifests = []
    for d in dirs:
        if (d / ADAPTER_MANIFEST).exists() or not d.is_dir():
            manifests.append(adapter_manifest.read(d))
            continue
        if not (d / PEFT_CONFIG).exists():
            raise UsageError(
                f"{d} has neither {ADAPTER_MANIFEST} nor {PEFT_CONFIG} — pass a dir written by edge-lora train or a "
                "PEFT adapter dir (save_pretrained)"
            )
        if options.trained_on is None:
            raise UsageError(
                f"{d} has no {ADAPTER_MANIFEST} (not trained by edge-lora): say how its base was held in training "
                f"with --trained-on {{{'|'.join(TRAINED_ON)}}} — nf4 for a QLoRA adapter (4-bit base), else the "
                "dtype a full-precision LoRA trained in (bf16, fp16 or fp32)"
            )
        base_model = base or json.loads((d / PEFT_CONFIG).read_text()).get("base_model_name_or_path")
        if not base_model:
            raise UsageError(f"{d}/{PEFT_CONFIG} names no base_model_name_or_path — pass the base with --base")
        model_dir = foreign_base_dir(d, base_model, given=base is not None)
        if model_dir not in fingerprints:
            fingerprints[model_dir] = adapter_manifest.fingerprint(model_dir)
        manifests.append(
            adapter_manifest.foreign(
                d, base_model, fingerprints[model_dir], options.trained_on, options.double_quant, options.compute_dtype
            )
        )
    if options.trained_on is not None and not fingerprints:
        raise UsageError(
            f"--trained-on is for adapter dirs without {ADAPTER_MANIFEST}; {dirs[0]} has one, which records how "
            "it was trained — drop --trained-on"
        )
    return manifests


def foreign_base_dir(adapter_dir: Path, base_model: str, given: bool) -> Path:
    """The local dir of a foreign adapter's base: --base when `given`, else adapter_config.json's
    base_model_name_or_path, whose failure names that key and --base as the fix. A checkpoint stored quantized
    is refused: the merge and the graph need the full-precision weights."""
    try:
        model_dir = resolve_model_dir(base_model).resolve()
    except UsageError as e:
        if given:
            raise
        reason = str(e).split(" — ")[0].removeprefix(f"--model {base_model}").strip(" :")
        raise UsageError(
            f"{adapter_dir}/{PEFT_CONFIG} names base {base_model!r}: {reason} — pass the base model dir with --base"
        ) from None
    quantized = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    if quantized:  # e.g. a "-bnb-4bit" checkpoint QLoRA tools load: the original weights are not in it
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise UsageError(
            f"base {base_model} is stored quantized ({method}) — pass the full-precision model it was made from "
            "with --base, and --trained-on nf4 for a 4-bit one"
        )
    return model_dir


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
