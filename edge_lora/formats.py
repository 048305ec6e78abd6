"""The vocabulary the stages share: option sets, the default device, and the names of the files each stage writes.

Standard library only: the runtime, the devices loader and the CLI import it without pulling in a training
library. Every module that names one of these uses it from here.
"""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["fp32", "fp16", "int8", "int4"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
Flavor = Literal["merged", "adapters"]
"""merged: LoRA folded into the weights; adapters: one base graph and an adapter file each, chosen at run time."""
FLAVORS: tuple[Flavor, ...] = get_args(Flavor)
Graph = Literal["optimum", "builder", "auto"]
"""Who writes the graph: optimum's exporter, onnxruntime-genai's model builder, or the builder where it applies."""
GRAPHS: tuple[Graph, ...] = get_args(Graph)

DEFAULT_DEVICE = "cpu-x86-64"
"""The device profile used when none is named: a generic CPU (also the one for architectures with no profile)."""

# The adapter dir (edge-lora train): PEFT's files and edge-lora's manifest beside them.
ADAPTER_MANIFEST = "edge_lora.json"
# The export dir (edge-lora export).
EXPORT_MANIFEST = "export.json"
PORTABLE_GRAPH = "model.onnx"  # the graph every onnxruntime runs
Q4_GRAPH = "model.q4.onnx"  # the same weights for edge-lora's MatMulQ4 op (edge_lora.runtime.kernels)
LORA_GRAPH = "model.lora.onnx"  # the portable graph with each projection's LoRA branches in one LoraAdd node
TOKENIZER_FILE = "tokenizer.json"
ADAPTER_SUFFIX = ".onnx_adapter"  # onnxruntime's adapter format, one file per adapter of an `adapters` export
KERNEL_ADAPTER_SUFFIX = ".q4.onnx_adapter"  # an adapter as the kernel graphs' one LoRA input takes it
# A builder graph's overridable initializer in front of the head: -1 runs the head on the last position alone,
# 0 on every position (edge_lora.export.graphs.builder writes it, edge_lora.runtime.cache binds it).
LOGITS_START = "logits_start"
