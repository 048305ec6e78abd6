"""`export()`: adapter dir → verified ONNX export dir, built in a temporary dir and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_lora import manifest as adapter_manifest
from edge_lora.data import read_jsonl
from edge_lora.errors import UsageError
from edge_lora.export.merge import MergeInto, merged_weights
from edge_lora.export.onnx_graph import MODEL_FILE, PRECISIONS, Precision, export_onnx, quantize
from edge_lora.export.parity import FALLBACK_PROMPTS, check
from edge_lora.export.reference import base_dir_of, full_precision_base, qlora_model
from edge_lora.progress import progress_bar
from edge_lora.runtime.package import EXPORT_MANIFEST, sha256_file

FORMAT_VERSION = 1
PARITY_PROMPTS = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json")


@dataclass(frozen=True)
class ExportOptions:
    """How an adapter becomes an export."""

    precision: Precision = "fp32"
    """Weight precision of the graph."""
    flavor: str = "merged"
    """"merged": adapter folded into the base weights. ("adapters" comes with the export issue.)"""
    merge_into: MergeInto = "dequantized"
    """Merge onto the 4-bit weights the adapter was trained against, dequantized, or onto the original ones."""
    opset: int = 18
    """ONNX opset of the graph."""
    int4_block_size: int = 32
    """Weights per int4 scale along the input dimension."""
    int4_accuracy_level: int = 4
    """MatMulNBits accuracy_level: 4 computes with int8 activations on CPUs that have VNNI/AVX-512."""
    device: str = "cpu-x86-64"
    """Device profile the export is made for; recorded in export.json and used by the runtime."""
    validate: bool = True
    """Run the parity gate and refuse an export that fails it."""

    def __post_init__(self):
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.flavor != "merged":
            problems.append(f"flavor {self.flavor!r} is not supported yet — use merged")
        if self.merge_into not in ("dequantized", "original"):
            problems.append(f"merge_into {self.merge_into!r} is not one of dequantized, original")
        if self.int4_block_size not in (16, 32, 64, 128):
            problems.append(f"int4_block_size {self.int4_block_size} is not one of 16, 32, 64, 128")
        if problems:
            raise UsageError("bad export options: " + "; ".join(problems))


class ParityError(UsageError):
    """The export does not compute what the trained model computes; nothing was written."""


def export(adapter_dir: str | Path, output: str | Path, options: ExportOptions = ExportOptions(),
           base: str | None = None, force: bool = False, overwrite: bool = False, show_progress: bool = True) -> Path:
    """Merge the adapter, export ONNX with KV cache at the chosen precision, check parity, write `output`."""
    import torch

    adapter_dir, output = Path(adapter_dir), Path(output)
    manifest = adapter_manifest.read(adapter_dir)
    if output.exists() and not overwrite:
        raise UsageError(f"output {output} already exists — choose another --output or pass --overwrite")
    model_dir = base_dir_of(adapter_dir, manifest, base, force)

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        with progress_bar("export", total=5, enabled=show_progress) as advance:
            reference = qlora_model(adapter_dir, model_dir, manifest)
            merged = full_precision_base(model_dir)
            original = merged.state_dict() if options.merge_into == "original" else None
            with torch.no_grad():
                for name, weight in merged_weights(reference, original).items():
                    merged.get_parameter(name).copy_(weight)
            advance(1, "merged")
            fp32_dir = work / "fp32"
            export_onnx(merged, fp32_dir, options.opset)
            advance(1, "ONNX graph")
            final = work / "final"
            final.mkdir()
            quantize(fp32_dir / MODEL_FILE, final / MODEL_FILE, options.precision,
                     options.int4_block_size, options.int4_accuracy_level)
            for name in TOKENIZER_FILES:
                if (fp32_dir / name).exists():
                    shutil.copy2(fp32_dir / name, final / name)
            advance(1, options.precision)
            export_json = describe(final, merged.config, manifest, adapter_dir, options)
            write_manifest(final, export_json)
            parity = None
            if options.validate:
                parity = run_parity(final, reference, manifest, options)
                export_json["parity"] = parity.to_dict()
                write_manifest(final, export_json)
            advance(1, "parity")
            if parity is not None and not parity.passed:
                raise ParityError(
                    f"parity gate failed for {options.precision}: max |Δlogit| {parity.max_abs_logit_diff:.2e}, "
                    f"greedy agreement {parity.greedy_agreement:.1%} (gate {parity.gate}) — nothing was written; "
                    "try a higher precision, or --no-validate to export anyway"
                )
            if output.exists():  # --overwrite: the old export goes only once the new one is complete
                shutil.rmtree(output)
            os.replace(final, output)
            advance(1, "done")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def describe(export_dir: Path, config, manifest: dict, adapter_dir: Path, options: ExportOptions) -> dict:
    """export.json without the parity report: graph signature, KV-cache layout, source, files."""
    import onnx

    graph = onnx.load(str(export_dir / MODEL_FILE), load_external_data=False).graph

    def signature(values):
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    eos = config.eos_token_id
    num_heads = config.num_attention_heads
    return {
        "format_version": FORMAT_VERSION,
        "kind": "export",
        "flavor": options.flavor,
        "precision": options.precision,
        "opset": options.opset,
        "options": options.__dict__,
        "device": options.device,
        "model_file": MODEL_FILE,
        "source_adapter": {"path": str(adapter_dir.resolve()), "manifest": manifest},
        "inputs": signature(graph.input),
        "outputs": signature(graph.output),
        "kv_cache": {
            "num_layers": config.num_hidden_layers,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or num_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            "layout": "(batch, kv_heads, seq, head_dim)",
            "past_names": "past_key_values.{layer}.{key|value}",
            "present_names": "present.{layer}.{key|value}",
            "context_length": config.max_position_embeddings,
        },
        "eos_token_ids": list(eos) if isinstance(eos, (list, tuple)) else [eos],
        "bos_token_id": config.bos_token_id,
        "vocab_size": config.vocab_size,
        "versions": adapter_manifest.library_versions() | {"onnx": onnx.__version__},
    }


def write_manifest(export_dir: Path, export_json: dict) -> None:
    export_json["files"] = {
        p.name: sha256_file(p) for p in sorted(export_dir.iterdir()) if p.is_file() and p.name != EXPORT_MANIFEST
    }
    (export_dir / EXPORT_MANIFEST).write_text(json.dumps(export_json, indent=2) + "\n")


def parity_prompts(manifest: dict) -> list[str]:
    """The first prompts of the adapter's eval set when it names one, else fixed generic prompts."""
    eval_data = (manifest.get("data") or {}).get("eval")
    if eval_data and Path(eval_data["path"]).exists():
        records = read_jsonl(eval_data["path"])[:PARITY_PROMPTS]
        prompts = [r.get("prompt") or r.get("text", "")[:64] for _, r in records]
        if all(prompts):
            return prompts
    return list(FALLBACK_PROMPTS)


def run_parity(export_dir: Path, reference, manifest: dict, options: ExportOptions):
    from edge_lora import runtime

    generator = runtime.load(export_dir, device=options.device)
    return check(reference, generator, parity_prompts(manifest), options.precision)
