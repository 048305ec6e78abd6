"""A graph beside a builder `adapters` export for edge-lora's portable LoRA op (runtime/kernels, LoraAdd).

The portable graph (model.onnx) adds each projection's LoRA branches as onnxruntime nodes beside its MatMulNBits:
MatMul (x · A) → MatMul (· B) per branch, a Concat for q, k and v's packed product, an Add — nodes of which each
costs onnxruntime a fixed overhead a token, whatever its size (BENCHMARKS.md, Runtime). model.lora.onnx is the same
graph with each projection's branches replaced by one LoraAdd node after its MatMulNBits, reading the same one LoRA
input as MatMulQ4 (export/kernel_graphs/q4.py; branches.py has the input's layout); each adapter's file of that
input is shared with the MatMulQ4 graph where both take the same slots.

The graph's weights are the portable graph's own: model.lora.onnx refers to model.onnx.data, so an export gains
a graph, not a second copy of its weights. The op is plain C++ that the host's compiler vectorizes (NEON, AVX2,
AVX-512): it is the runtime's choice wherever MatMulQ4 cannot run and a C++ compiler can build it, an Arm board's
or an AVX2 laptop's.
"""

from __future__ import annotations

from pathlib import Path

from edge_lora.export.kernel_graphs.branches import find_branches, swap_nodes, write_adapter
from edge_lora.formats import LORA_GRAPH, PORTABLE_GRAPH
from edge_lora.runtime.kernels import DOMAIN, FORMATS, LORA_ADD, LORA_INPUT

LORA_OP = "LoraAdd"


def external_data_files(proto) -> set[str]:
    """The files a graph's initializers keep their data in (ONNX external data), by their paths in the export."""
    return {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == tensor.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def write(export_dir: Path, adapters: dict[str, dict], shared: dict | None = None) -> dict | None:
    """model.lora.onnx beside the builder graph in `export_dir`, and each adapter's LoRA input file (`adapters`:
    export.json's entries) unless `shared` (another kernel's export.json entry) has them for the same slots;
    export.json's entry for it, or None when the graph has no LoRA branches."""
    import onnx
    from onnx import helper

    # the weights stay where they are: their external-data references now point from both graphs to one file
    proto = onnx.load(str(export_dir / PORTABLE_GRAPH), load_external_data=False)
    graph = proto.graph
    by_name = {node.name: node for node in graph.node}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    dropped, added, pairs = set(), [], {}
    for node in list(graph.node):
        if node.op_type != "MatMulNBits":
            continue
        found = find_branches(graph, node, by_name, initializers)
        if found is None:
            continue
        dropped |= found.nodes
        name = node.name.rsplit("/", 1)[0] + "/lora/LoraAdd"
        added.append(
            helper.make_node(
                LORA_OP, [node.output[0], node.input[0], LORA_INPUT], [found.output], name=name, domain=DOMAIN
            )
        )
        pairs[name] = found.pairs
    if not added:
        return None
    slots = swap_nodes(proto, dropped, added, pairs)
    onnx.save(proto, str(export_dir / LORA_GRAPH))
    entry = {
        "model_file": LORA_GRAPH,
        "format": FORMATS[LORA_ADD],
        "nodes": len(added),
        "data_files": sorted(external_data_files(proto)),
        "lora_slots": slots,
        "adapters": {},
    }
    for name, adapter in adapters.items():
        if shared and shared.get("lora_slots") == slots and name in shared.get("adapters", {}):
            entry["adapters"][name] = dict(shared["adapters"][name])
        else:
            entry["adapters"][name] = {"file": write_adapter(export_dir, adapter["file"], slots)}
    return entry
