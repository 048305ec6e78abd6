"""export.json: what the runtime and the profiler read about an export — its graph's signature, KV-cache layout,
weight bytes, source adapters and lineage — and every file's sha256, written last."""

from __future__ import annotations

from pathlib import Path

from edge_lora.export.graphs import builder as builder_graph
from edge_lora.export.inputs import ExportInputs
from edge_lora.export.models import Models
from edge_lora.formats import EXPORT_MANIFEST, PORTABLE_GRAPH, ExportManifest, sha256_file
from edge_lora.lineage import export_lineage
from edge_lora.train import manifest as adapter_manifest

FORMAT_VERSION = 1


def describe(export_dir: Path, inputs: ExportInputs, models: Models) -> dict:
    """export.json without adapters, kernel graphs, files and parity: graph signature, weight bytes, KV-cache
    layout, source, lineage, the merge report, and which adapters came without edge_lora.json."""
    import onnx

    from edge_lora.export.graphs.weight_bytes import weight_bytes

    options, config = inputs.options, models.model.config
    graph_path = export_dir / PORTABLE_GRAPH
    proto = onnx.load(str(graph_path), load_external_data=False)
    eos = config.eos_token_id
    return {
        "format_version": FORMAT_VERSION,
        "kind": "export",
        "flavor": options.flavor,
        "graph": options.graph,
        "precision": options.precision,
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "options": options.__dict__,
        "device": options.device,
        "model_file": PORTABLE_GRAPH,
        **weight_bytes(graph_path),
        "source_adapter": {"path": str(inputs.dirs[0].resolve()), "manifest": inputs.manifests[0].to_dict()},
        "inputs": _signature(proto.graph.input),
        "outputs": _signature(proto.graph.output),
        "kv_cache": kv_cache(config) | (builder_graph.KV_CACHE if options.graph == "builder" else {}),
        "eos_token_ids": list(eos) if isinstance(eos, (list, tuple)) else [eos],
        "bos_token_id": config.bos_token_id,
        "vocab_size": config.vocab_size,
        "versions": adapter_manifest.library_versions() | {"onnx": onnx.__version__},
        "lineage": export_lineage(inputs.dirs, inputs.names, inputs.manifests, options),
        "merge": models.merge_report,
    } | foreign_adapters(inputs)


def foreign_adapters(inputs: ExportInputs) -> dict:
    """export.json's "foreign": {name: how it was described} of the adapters without edge_lora.json; {} if none."""
    foreign = {name: m.foreign for name, m in zip(inputs.names, inputs.manifests) if m.foreign}
    return {"foreign": foreign} if foreign else {}


def kv_cache(config) -> dict:
    """export.json's kv_cache: the cache's shape, layout and names (a builder graph updates them by KV_CACHE)."""
    num_heads = config.num_attention_heads
    return {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        "layout": "(batch, kv_heads, seq, head_dim)",
        "past_names": "past_key_values.{layer}.{key|value}",
        "present_names": "present.{layer}.{key|value}",
        "context_length": config.max_position_embeddings,
    }


def _signature(values) -> list[dict]:
    from onnx import helper

    return [
        {
            "name": v.name,
            "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        }
        for v in values
    ]


def write_manifest(export_dir: Path, export_json: dict) -> None:
    """export.json in `export_dir`, its "files" the sha256 of every other file there."""
    export_json["files"] = {
        p.relative_to(export_dir).as_posix(): sha256_file(p)
        for p in sorted(export_dir.rglob("*"))
        if p.is_file() and p.name != EXPORT_MANIFEST
    }
    # Checked as the runtime reads it (ExportManifest), so that an export this writer cannot describe fails here.
    ExportManifest.from_dict(export_json, str(export_dir / EXPORT_MANIFEST)).save(export_dir)
