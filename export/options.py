"""ExportOptions: how an adapter becomes an export, checked when made; and which graph writer "auto" picks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from edge_lora import devices
from edge_lora.errors import UsageError
from edge_lora.export.graphs import builder as builder_graph
from edge_lora.export.merge import MergeInto
from edge_lora.formats import DEFAULT_DEVICE, FLAVORS, GRAPHS, PRECISIONS, Flavor, Graph, Precision
from edge_lora.train.config import ComputeDtype
from edge_lora.train.manifest import TRAINED_ON


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
    """Who writes the graph: "torch", torch's ONNX exporter (export/graphs/portable.py: every architecture there, every
    precision; shape ops as node chains);
    "builder", onnxruntime-genai's model builder (Llama-family, fp32 or int4: fused attention with the KV cache in
    one shared buffer, fewer nodes a layer, faster decode: BENCHMARKS.md, Runtime); "auto", the builder where it
    writes the architecture and precision asked for, torch's exporter otherwise (export.json records which)."""
    kernels: tuple[str, ...] | None = None
    """edge-lora kernels to write a graph for beside the portable one: "matmul_q4" (export/kernel_graphs/q4.py),
    for a builder int4 graph in blocks of 32 or 64 with accuracy_level 4; "lora_add"
    (export/kernel_graphs/lora_add.py), for a builder int4 `adapters` graph. None: those the device profile lists."""
    trained_on: str | None = None
    """For adapter dirs without edge_lora.json (PEFT adapters from other tools), how their base was held in
    training: "nf4" or "fp4" (QLoRA, bitsandbytes 4-bit: the reference and the merge use the dequantized 4-bit
    weights) or "bf16", "fp16", "fp32" (a full-precision LoRA: the base in that dtype, merged onto its own weights).
    Required when such a dir is given; refused when none is."""
    double_quant: bool = True
    """trained_on nf4 or fp4: whether the 4-bit block scales were quantized too (bitsandbytes' double quant)."""
    compute_dtype: str = "auto"
    """trained_on nf4 or fp4: the 4-bit layers' compute dtype in training, recorded (the reference computes fp32)."""

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
        if self.graph == "optimum":  # what exports made before transformers 5 record; readable, not writable
            problems.append(
                "graph 'optimum' cannot be written: optimum-onnx cannot be installed beside transformers 5 — "
                "use --graph torch, the same kind of graph"
            )
        elif self.graph not in GRAPHS:
            problems.append(f"graph {self.graph!r} is not one of {', '.join(GRAPHS)}")
        if self.graph == "builder" and self.precision not in builder_graph.PRECISIONS:
            problems.append(
                f"graph builder writes precision {' or '.join(builder_graph.PRECISIONS)}, got "
                f"{self.precision!r} — use --graph torch for it"
            )
        if self.trained_on is not None and self.trained_on not in TRAINED_ON:
            problems.append(f"trained_on {self.trained_on!r} is not one of {', '.join(TRAINED_ON)}")
        if self.compute_dtype not in get_args(ComputeDtype):
            problems.append(f"compute_dtype {self.compute_dtype!r} is not one of {', '.join(get_args(ComputeDtype))}")
        unknown = [k for k in self.kernels or () if k not in devices.KERNELS]
        if unknown:
            problems.append(f"kernel {unknown[0]!r} is not one of {', '.join(devices.KERNELS)}")
        if problems:
            raise UsageError("bad export options: " + "; ".join(problems))


def auto_graph(model_type: str | None, options: ExportOptions) -> str:
    """The builder's graph where it writes this architecture and precision; torch's otherwise."""
    fits = model_type in builder_graph.MODEL_TYPES and options.precision in builder_graph.PRECISIONS
    return "builder" if fits else "torch"
