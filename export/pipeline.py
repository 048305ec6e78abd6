"""`export()`: adapter dir → verified ONNX export dir, built in a temporary dir and renamed into place.

The stages, each in its own module: inputs.py checks what the export starts from (with peft_config.py, what of
a PEFT adapter dir can be exported; a dir without edge_lora.json is described by ExportOptions.trained_on),
models.py loads the trained model and the full-precision one with the graph's weights, graphs/ writes the graph
(portable.py or builder.py, with lora_inputs.py's LoRA inputs for the `adapters` flavor), adapters.py writes the
adapter files, kernel_graphs/ the graphs for edge-lora's kernels, parity.py gates the result against the trained
model, and manifest.py writes export.json.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from edge_lora.export.adapters import write_adapters
from edge_lora.export.graphs import builder as builder_graph
from edge_lora.export.graphs import lora_inputs
from edge_lora.export.graphs.portable import export_onnx, quantize
from edge_lora.export.inputs import ExportInputs, resolve_inputs
from edge_lora.export.kernel_graphs import write_kernel_graphs
from edge_lora.export.manifest import describe, write_manifest
from edge_lora.export.models import Models, load_models
from edge_lora.export.options import ExportOptions
from edge_lora.export.parity import gate
from edge_lora.formats import GENERATION_CONFIG, PORTABLE_GRAPH, TOKENIZER_FILE
from edge_lora.progress import progress_bar

TOKENIZER_FILES = (
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    GENERATION_CONFIG,
    "config.json",
)


def export(
    adapter_dirs: str | Path | list,
    output: str | Path,
    options: ExportOptions = ExportOptions(),
    base: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Export one adapter merged, or several (flavor `adapters`) beside one base graph: ONNX with KV cache at
    the chosen precision, parity checked against the trained models, built in a temporary dir and renamed
    into `output` only when complete."""
    inputs = resolve_inputs(adapter_dirs, output, options, base, force, overwrite)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        with progress_bar("export", total=5, enabled=show_progress) as advance:
            models = load_models(inputs)
            advance(1, "merged" if inputs.options.flavor == "merged" else "base weights")
            final = write_graph(inputs, models, work, advance)
            export_json = describe(final, inputs, models)
            export_json |= write_adapters_and_kernel_graphs(final, inputs, models)
            write_manifest(final, export_json)
            advance(1, inputs.options.precision)
            if inputs.options.validate:
                gate(final, export_json, inputs, models.reference)
                write_manifest(final, export_json)
            advance(1, "parity")
            if output.exists():  # --overwrite: the old export goes only once the new one is complete
                shutil.rmtree(output)
            os.replace(final, output)
            advance(1, "done")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def write_graph(inputs: ExportInputs, models: Models, work: Path, advance: Callable) -> Path:
    """The graph at the export's precision, with its LoRA inputs for the `adapters` flavor, and the tokenizer files,
    in work/final; that dir."""
    options, final = inputs.options, work / "final"
    modules = lora_inputs.lora_modules(models.reference) if options.flavor == "adapters" else None
    if options.graph == "builder":
        builder_graph.build_graph(
            models.model,
            inputs.model_dir,
            final,
            options.precision,
            options.int4_block_size,
            options.int4_accuracy_level,
            options.int4_head,
            TOKENIZER_FILES,
        )
        if modules is not None:
            lora_inputs.add_builder_lora_inputs(final / PORTABLE_GRAPH, modules, models.model.config)
        advance(1, "builder graph")
        return final
    fp32_dir = work / "fp32"
    graph = export_onnx(models.model, fp32_dir, options.opset)
    if modules is not None:
        lora_inputs.rewrite_torch_graph(graph, modules)
    write_hf_files(models.model, inputs.model_dir, fp32_dir)
    advance(1, "ONNX graph")
    final.mkdir()
    quantize(
        graph,
        final / PORTABLE_GRAPH,
        options.precision,
        options.int4_block_size,
        options.int4_accuracy_level,
        options.int4_head,
    )
    for name in TOKENIZER_FILES:
        if (fp32_dir / name).exists():
            shutil.copy2(fp32_dir / name, final / name)
    return final


def write_hf_files(model, tokenizer_dir: Path, out_dir: Path) -> None:
    """The files transformers writes beside a model that the runtime reads (TOKENIZER_FILES): the model's config and
    generation config, and the tokenizer of `tokenizer_dir`, saved into `out_dir`."""
    from transformers import AutoTokenizer

    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)


def write_adapters_and_kernel_graphs(export_dir: Path, inputs: ExportInputs, models: Models) -> dict:
    """export.json's "adapters" (flavor `adapters`) and "kernels" (where any kernel graph is written), their files
    written into `export_dir`."""
    entries = {}
    if inputs.options.flavor == "adapters":
        entries["adapters"] = write_adapters(
            export_dir, models.reference, inputs.names, inputs.dirs, inputs.manifests, inputs.options.precision
        )
    kernel_graphs = write_kernel_graphs(export_dir, entries.get("adapters", {}), inputs.options)
    if kernel_graphs:
        entries["kernels"] = kernel_graphs
    return entries
