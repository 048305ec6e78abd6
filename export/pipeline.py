"""`export()`: adapter dir → verified ONNX export dir, built in a temporary dir and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

from edge_lora import devices
from edge_lora.train import manifest as adapter_manifest
from edge_lora.train.data import read_jsonl
from edge_lora.errors import UsageError
from edge_lora.export.graphs import builder as builder_graph, lora_inputs
from edge_lora.export.graphs.builder import PRECISIONS as BUILDER_PRECISIONS
from edge_lora.export.merge import MergeInto, merged_weights
from edge_lora.export.graphs.optimum import export_onnx, quantize, supported_model_types
from edge_lora.formats import ADAPTER_SUFFIX, DEFAULT_DEVICE, EXPORT_MANIFEST, FLAVORS, PORTABLE_GRAPH, PRECISIONS, Flavor, Graph, Precision
from edge_lora.export.parity import FALLBACK_PROMPTS, check
from edge_lora.train.reference import base_dir_of, fp32_twin, full_precision_base, qlora_model
from edge_lora.lineage import export_lineage
from edge_lora.progress import progress_bar
from edge_lora.runtime.package import sha256_file

FORMAT_VERSION = 1
PARITY_PROMPTS = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", "config.json")


@dataclass(frozen=True)
class ExportOptions:
    """How an adapter becomes an export."""

    precision: Precision = "fp32"
    """Weight precision of the graph."""
    flavor: Flavor = "merged"
    """"merged": the adapter folded into the base weights; "adapters": one base graph with LoRA inputs and one
    .onnx_adapter file per adapter, switched per request on the device."""
    merge_into: MergeInto = "dequantized"
    """Merge onto the 4-bit weights the adapter was trained against, dequantized, or onto the original ones."""
    opset: int = 18
    """ONNX opset of the graph."""
    int4_block_size: int = 32
    """Weights per int4 scale along the input dimension."""
    int4_accuracy_level: int = 4
    """MatMulNBits accuracy_level: 4 computes with int8 activations on CPUs that have VNNI/AVX-512."""
    int4_head: bool = True
    """Quantize the output head's MatMul (a tied embedding's too) to int4; False keeps it in fp32."""
    device: str = DEFAULT_DEVICE
    """Device profile the export is made for; recorded in export.json and used by the runtime."""
    validate: bool = True
    """Run the parity gate and refuse an export that fails it."""
    graph: Graph = "auto"
    """Who writes the graph: "optimum", optimum's exporter (every architecture it knows, about 105 nodes a layer);
    "builder", onnxruntime-genai's model builder (Llama-family, fp32 or int4: fused attention with the KV cache in
    one shared buffer, about 14 nodes a layer, 1.9× decode); "auto", the builder where it writes the architecture
    and precision asked for, optimum's exporter otherwise (export.json records which)."""
    kernels: tuple[str, ...] | None = None
    """edge-lora kernels to write a graph for beside the portable one: "matmul_q4" (export/kernel_graphs/q4.py), for a
    builder int4 graph in blocks of 32 or 64 with accuracy_level 4; "lora_add" (export/kernel_graphs/lora_add.py), for a builder
    int4 `adapters` graph. None: those the device profile lists."""

    def __post_init__(self):
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.flavor not in FLAVORS:
            problems.append(f"flavor {self.flavor!r} is not one of {', '.join(FLAVORS)}")
        if self.merge_into not in ("dequantized", "original"):
            problems.append(f"merge_into {self.merge_into!r} is not one of dequantized, original")
        if self.int4_accuracy_level not in (0, 1, 2, 3, 4):
            problems.append(f"int4_accuracy_level {self.int4_accuracy_level} is not one of 0, 1, 2, 3, 4")
        if self.int4_block_size not in (16, 32, 64, 128):
            problems.append(f"int4_block_size {self.int4_block_size} is not one of 16, 32, 64, 128")
        if self.graph not in get_args(Graph):
            problems.append(f"graph {self.graph!r} is not one of {', '.join(get_args(Graph))}")
        if self.graph == "builder" and self.precision not in BUILDER_PRECISIONS:
            problems.append(f"graph builder writes precision {' or '.join(BUILDER_PRECISIONS)}, got {self.precision!r} — "
                            "use --graph optimum for it")
        unknown = [k for k in self.kernels or () if k not in devices.KERNELS]
        if unknown:
            problems.append(f"kernel {unknown[0]!r} is not one of {', '.join(devices.KERNELS)}")
        if problems:
            raise UsageError("bad export options: " + "; ".join(problems))


def auto_graph(model_type: str | None, options: ExportOptions) -> str:
    """The builder's graph where it writes this architecture and precision; optimum's otherwise."""
    fits = model_type in builder_graph.MODEL_TYPES and options.precision in BUILDER_PRECISIONS
    return "builder" if fits else "optimum"


class ParityError(UsageError):
    """The export does not compute what the trained model computes; nothing was written."""


def export(adapter_dirs: str | Path | list, output: str | Path, options: ExportOptions = ExportOptions(),
           base: str | None = None, force: bool = False, overwrite: bool = False, show_progress: bool = True) -> Path:
    """Export one adapter merged, or several (flavor `adapters`) beside one base graph: ONNX with KV cache at
    the chosen precision, parity checked against the trained models, built in a temporary dir and renamed
    into `output` only when complete."""
    dirs = [Path(d) for d in (adapter_dirs if isinstance(adapter_dirs, (list, tuple)) else [adapter_dirs])]
    output = Path(output)
    if options.flavor == "merged" and len(dirs) != 1:
        raise UsageError(f"flavor merged takes one adapter dir, got {len(dirs)} — pass one, or --flavor adapters")
    names = [d.resolve().name for d in dirs]
    if len(set(names)) != len(names):
        raise UsageError(f"adapter dirs must have distinct names (they name the adapters): {', '.join(map(str, dirs))}")
    manifests = [adapter_manifest.read(d) for d in dirs]
    for d in dirs:
        check_adapter_weights(d)
    if output.exists() and not overwrite:
        raise UsageError(f"output {output} already exists — choose another --output or pass --overwrite")
    model_dir = base_dir_of(dirs[0], manifests[0], base, force)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if options.graph == "auto":
        options = replace(options, graph=auto_graph(model_type, options))
    if options.graph == "builder":
        builder_graph.check_supported(model_type, model_dir)
    elif model_type not in (supported := supported_model_types()):
        raise UsageError(f"{model_dir}: architecture {model_type!r} cannot be exported with a KV cache — supported: {', '.join(supported)}")
    for d, m in zip(dirs[1:], manifests[1:]):
        if m["base_fingerprint"]["digest"] != manifests[0]["base_fingerprint"]["digest"] or \
                m["training"]["quant"] != manifests[0]["training"]["quant"]:
            raise UsageError(f"{d} was trained on another base or quantization than {dirs[0]} — adapters that share "
                             "one base graph must come from the same base and quant settings")

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        with progress_bar("export", total=5, enabled=show_progress) as advance:
            reference = qlora_model(dirs, model_dir, manifests[0], names)
            model = full_precision_base(model_dir)
            merge_report = load_weights(model, reference, options, manifests[0], dirs[0])
            advance(1, "merged" if options.flavor == "merged" else "base weights")
            final = work / "final"
            if options.graph == "builder":
                builder_graph.build_graph(model, model_dir, final, options.precision, options.int4_block_size,
                                          options.int4_accuracy_level, options.int4_head, TOKENIZER_FILES)
                if options.flavor == "adapters":
                    lora_inputs.add_builder_lora_inputs(final / PORTABLE_GRAPH, lora_inputs.lora_modules(reference),
                                                        model.config)
                advance(1, "builder graph")
            else:
                fp32_dir = work / "fp32"
                graph = export_onnx(model, fp32_dir, options.opset)
                if options.flavor == "adapters":
                    lora_inputs.rewrite_optimum_graph(graph, lora_inputs.lora_modules(reference))
                advance(1, "ONNX graph")
                final.mkdir()
                quantize(graph, final / PORTABLE_GRAPH, options.precision, options.int4_block_size,
                         options.int4_accuracy_level, options.int4_head)
                for name in TOKENIZER_FILES:
                    if (fp32_dir / name).exists():
                        shutil.copy2(fp32_dir / name, final / name)
            export_json = describe(final, model.config, manifests[0], dirs[0], options)
            export_json["lineage"] = export_lineage(dirs, names, manifests, options)
            export_json["merge"] = merge_report
            if options.flavor == "adapters":
                export_json["adapters"] = write_adapters(final, reference, names, dirs, manifests, options)
            kernel_graphs = write_kernel_graphs(final, export_json, options)
            if kernel_graphs:
                export_json["kernels"] = kernel_graphs
            write_manifest(final, export_json)
            advance(1, options.precision)
            if options.validate:
                twin, export_json["parity_reference"] = parity_reference(reference, model_dir, dirs, names, manifests[0])
                export_json["parity"] = run_parity(final, twin, names, manifests, options, dirs[0], kernels=())
                for kernel in kernel_graphs:  # each kernel's graph is gated like the portable one, where it runs
                    entry = export_json["kernels"][kernel]
                    problem = kernel_problem(kernel)
                    entry["parity"] = {"skipped": problem} if problem else run_parity(
                        final, twin, names, manifests, options, dirs[0], kernels=(kernel,))
                write_manifest(final, export_json)
                reports = {**export_json["parity"], **{f"{k} {name}": p for k, e in kernel_graphs.items()
                                                       for name, p in e.get("parity", {}).items() if name != "skipped"}}
                failed = {k: v for k, v in reports.items() if not v["passed"]}
                if failed:
                    which, p = next(iter(failed.items()))
                    raise ParityError(
                        f"parity gate failed for {options.precision} ({which}): max |Δlogit| {p['max_abs_logit_diff']:.2e}, "
                        f"greedy agreement {p['greedy_agreement']:.1%} (gate {p['gate']}) — nothing was written; "
                        "try a higher precision, or --no-validate to export anyway"
                    )
            advance(1, "parity")
            if output.exists():  # --overwrite: the old export goes only once the new one is complete
                shutil.rmtree(output)
            os.replace(final, output)
            advance(1, "done")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def check_adapter_weights(adapter_dir: Path) -> None:
    """A readable adapter_model.safetensors with finite tensors, or one line that says which file is broken."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} cannot be read ({e}) — the file is missing or corrupt; restore it or train again") from None
    broken = [name for name, t in tensors.items() if not t.isfinite().all()]
    if broken:
        raise UsageError(f"{path}: tensor {broken[0]} holds NaN or inf — the adapter is broken; train again")


def load_weights(model, reference, options: ExportOptions, manifest: dict, tokenizer_dir: Path) -> dict:
    """Put into the full-precision `model` what the graph should hold; returns the merge report.

    merged: the base (dequantized 4-bit or original) plus the adapter's delta. The report gives the logit error
    of both merge choices against the trained model, so a user sees which is closer and by how much.
    adapters: the base alone, as the adapters were trained against it (dequantized) or the original weights.
    """
    import numpy as np
    import torch

    from edge_lora.train.qlora import dequantized_weights

    original = {k: v.clone() for k, v in model.state_dict().items()}
    if options.flavor == "adapters":
        weights = dequantized_weights(reference) if options.merge_into == "dequantized" else {}
        with torch.no_grad():
            for name, weight in weights.items():
                model.get_parameter(name).copy_(weight)
        return {"into": options.merge_into}
    prompts = [torch.tensor([ids]) for ids in reference_prompt_ids(tokenizer_dir, manifest)]
    errors = {}
    with torch.no_grad():
        expected = [reference(ids).logits for ids in prompts]
        # the other choice first, so that the chosen one is what stays in the model
        for into in sorted(("dequantized", "original"), key=lambda c: c == options.merge_into):
            model.load_state_dict(original)
            for name, weight in merged_weights(reference, original if into == "original" else None).items():
                model.get_parameter(name).copy_(weight)
            diffs = [(model(ids).logits - ref).abs() for ids, ref in zip(prompts, expected)]
            errors[into] = {"max_abs_logit_diff": float(max(d.max() for d in diffs)),
                            "mean_abs_logit_diff": float(np.mean([d.mean().item() for d in diffs]))}
    return {"into": options.merge_into, "vs_trained_model": errors}


def reference_prompt_ids(tokenizer_dir: Path, manifest: dict) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tokenizer(p)["input_ids"] for p in parity_prompts(manifest)]


def write_adapters(export_dir: Path, reference, names: list[str], dirs: list[Path], manifests: list[dict],
                   options: ExportOptions) -> dict:
    """adapters/<name>.onnx_adapter for each adapter; their entries for export.json."""
    import numpy as np

    from edge_lora.export.adapters import adapter_tensors, write_adapter

    (export_dir / "adapters").mkdir()
    dtype = np.float16 if options.precision == "fp16" else np.float32  # the graph's LoRA inputs' type
    entries = {}
    for name, adapter_dir, manifest in zip(names, dirs, manifests):
        tensors = adapter_tensors(reference, name, dtype)
        file = f"adapters/{name}{ADAPTER_SUFFIX}"
        write_adapter(tensors, export_dir / file)
        entries[name] = {"file": file, "inputs": sorted(tensors), "source_adapter": str(adapter_dir.resolve()),
                         "lora": manifest["lora"], "base_fingerprint": manifest["base_fingerprint"]["digest"]}
    return entries


def write_kernel_graphs(export_dir: Path, export_json: dict, options: ExportOptions) -> dict:
    """{kernel: export.json entry} for each kernel graph written beside the portable one, in the order the runtime
    prefers them: matmul_q4's (export/kernel_graphs/q4.py), then, for an `adapters` export, lora_add's
    (export/kernel_graphs/lora_add.py), which takes matmul_q4's adapter files where the two take the same LoRA input."""
    from edge_lora.export.kernel_graphs import lora_add as lora_graph, q4 as q4_graph

    kernels = devices.load(options.device).kernels if options.kernels is None else options.kernels
    if options.graph != "builder" or options.precision != "int4":
        return {}
    adapters, written = export_json.get("adapters", {}), {}
    if "matmul_q4" in kernels:
        entry = q4_graph.write(export_dir, adapters)
        if entry:
            written["matmul_q4"] = entry
    if "lora_add" in kernels and options.flavor == "adapters":
        entry = lora_graph.write(export_dir, adapters, shared=written.get("matmul_q4"))
        if entry:
            written["lora_add"] = entry
    return written


def kernel_problem(kernel: str) -> str | None:
    """Why this host cannot run `kernel` (None when it can): its parity is then left to the device."""
    from edge_lora.runtime import kernels

    try:
        kernels.library(kernel)
    except kernels.KernelUnavailable as e:
        return f"not checked on the exporting host: {e}"
    return None


def describe(export_dir: Path, config, manifest: dict, adapter_dir: Path, options: ExportOptions) -> dict:
    """export.json without the parity report: graph signature, KV-cache layout, source, files."""
    import onnx

    proto = onnx.load(str(export_dir / PORTABLE_GRAPH), load_external_data=False)
    graph = proto.graph

    def signature(values):
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    eos = config.eos_token_id
    num_heads = config.num_attention_heads
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
        } | (builder_graph.KV_CACHE if options.graph == "builder" else {}),
        "eos_token_ids": list(eos) if isinstance(eos, (list, tuple)) else [eos],
        "bos_token_id": config.bos_token_id,
        "vocab_size": config.vocab_size,
        "versions": adapter_manifest.library_versions() | {"onnx": onnx.__version__},
    }


def write_manifest(export_dir: Path, export_json: dict) -> None:
    export_json["files"] = {
        p.relative_to(export_dir).as_posix(): sha256_file(p)
        for p in sorted(export_dir.rglob("*")) if p.is_file() and p.name != EXPORT_MANIFEST
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


TWIN_TOLERANCE = 1e-4  # a tenth of the fp32 gate: within it the twin is the trained model for the gate's purpose


def parity_reference(reference, model_dir: Path, dirs: list[Path], names: list[str], manifest: dict):
    """The model the parity gate generates with: the fp32 twin of the trained 4-bit model (reference.fp32_twin)
    when its logits match the 4-bit model's on the parity prompts, for every adapter, within TWIN_TOLERANCE;
    else the 4-bit model itself. Returns it and a record of the check for export.json."""
    import torch

    twin = fp32_twin(reference, model_dir, dirs, names)
    prompts = [torch.tensor([ids]) for ids in reference_prompt_ids(dirs[0], manifest)]
    gap = 0.0
    with torch.no_grad():
        for name in names:
            reference.set_adapter(name)
            twin.set_adapter(name)
            gap = max(gap, *((twin(ids).logits - reference(ids).logits).abs().max().item() for ids in prompts))
    reference.set_adapter(names[0])
    twin.set_adapter(names[0])
    record = {"twin_max_abs_logit_diff": gap, "tolerance": TWIN_TOLERANCE}
    if gap <= TWIN_TOLERANCE:
        return twin, record | {"model": "fp32 twin of the 4-bit model (dequantized weights, same adapters)"}
    return reference, record | {"model": "4-bit model (its fp32 twin differed beyond the tolerance)"}


def run_parity(export_dir: Path, reference, names: list[str], manifests: list[dict], options: ExportOptions,
               tokenizer_dir: Path, kernels: tuple[str, ...] = ()) -> dict:
    """Parity reports by what was checked: "merged"; or each adapter by name and "base" (no adapter active).
    Where an adapter's manifest names an eval set of prompt/completion records, its report also gives the
    task accuracy of the ONNX model beside the reference's. `kernels`: the graph for those kernels, not the
    portable one."""
    from transformers import AutoTokenizer

    from edge_lora import runtime
    from edge_lora.export.parity import task_accuracy

    generator = runtime.load(export_dir, device=options.device, kernels=kernels)
    if tuple(kernels) != ((generator.kernel,) if generator.kernel else ()):
        raise RuntimeError(f"{export_dir}: asked for kernels {kernels}, the runtime took {generator.kernel}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def report(gen, manifest: dict) -> dict:
        result = check(reference, gen, parity_prompts(manifest), options.precision).to_dict()
        samples = eval_samples(manifest)
        if samples:
            result["task_accuracy"] = task_accuracy(reference, gen, tokenizer, samples)
        return result

    if options.flavor == "merged":
        return {"merged": report(generator, manifests[0])}
    reports = {}
    for name, manifest in zip(names, manifests):
        reference.set_adapter(name)
        reports[name] = report(generator.with_adapter(name), manifest)
    with reference.disable_adapter():
        reports["base"] = check(reference, generator, parity_prompts(manifests[0]), options.precision).to_dict()
    return reports


def eval_samples(manifest: dict) -> list[dict]:
    """The adapter's eval file's prompt/completion records, if it names one that still exists."""
    eval_data = (manifest.get("data") or {}).get("eval")
    if not eval_data or not Path(eval_data["path"]).exists():
        return []
    records = [r for _, r in read_jsonl(eval_data["path"])]
    return [r for r in records if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)]
