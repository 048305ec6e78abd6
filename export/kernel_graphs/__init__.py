"""Graphs for edge-lora's own onnxruntime ops (edge_lora.runtime.kernels), written beside a builder export's
model.onnx over the same weights: model.q4.onnx (q4.py, MatMulQ4) and model.lora.onnx (lora_add.py, LoraAdd), both
taking a projection's LoRA branches as branches.py finds them."""

from __future__ import annotations

from pathlib import Path

from edge_lora.formats import LORA_ADD, MATMUL_Q4


def write_kernel_graphs(export_dir: Path, adapters: dict[str, dict], options) -> dict:
    """{kernel: export.json entry} for each kernel graph written beside the portable one, in the order the runtime
    prefers them: matmul_q4's, then, for an `adapters` export, lora_add's, which takes matmul_q4's adapter files
    where the two take the same LoRA input. `adapters`: export.json's adapter entries; `options`: the export's
    ExportOptions. Each entry records its graph's weight bytes as the portable graph's are (manifest.py)."""
    from edge_lora import devices
    from edge_lora.export.graphs.weight_bytes import weight_bytes
    from edge_lora.export.kernel_graphs import lora_add, q4

    kernels = devices.load(options.device).kernels if options.kernels is None else options.kernels
    if options.graph != "builder" or options.precision != "int4":
        return {}
    written = {}
    if MATMUL_Q4 in kernels:
        entry = q4.write(export_dir, adapters)
        if entry:
            written[MATMUL_Q4] = entry
    if LORA_ADD in kernels and options.flavor == "adapters":
        entry = lora_add.write(export_dir, adapters, shared=written.get(MATMUL_Q4))
        if entry:
            written[LORA_ADD] = entry
    return {kernel: entry | weight_bytes(export_dir / entry["model_file"]) for kernel, entry in written.items()}
