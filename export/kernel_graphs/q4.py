"""A second graph beside a builder int4 export, for edge-lora's int4 kernel (runtime/kernels, MatMulQ4).

The portable graph (model.onnx) runs its int4 projections as MatMulNBits, onnxruntime's MLAS kernels, and an
`adapters` export adds each LoRA branch as MatMul → MatMul → Add beside them. model.q4.onnx is the same graph
with every MatMulNBits that MatMulQ4 computes the same way — 4 bits, blocks of 32 or 64, no zero points, int8
activations (accuracy_level 4), N a multiple of 16 — replaced by a MatMulQ4 node whose weights are the same
values repacked into its tiles, their scales rounded to float16 (a relative 2^-11 at most, against int4's
steps of the whole scale), and with the projection's LoRA branches folded into that node: one uint8 input,
`lora`, carries every node's pairs (q, k and v share the packed qkv product; branches.py has its layout), and each
adapter gets a second file, adapters/NAME.q4.onnx_adapter, with its A and B in that form: int8, a scale per rank
(A per column, B per row). The parity gate checks the whole graph against the trained model like the portable one.

The runtime opens model.q4.onnx when the device profile lists the kernel and it builds on the host; otherwise the
portable graph. Both are listed in export.json with their sha256.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_lora.export.kernel_graphs.branches import find_branches, swap_nodes, write_adapter
from edge_lora.formats import PORTABLE_GRAPH, Q4_GRAPH
from edge_lora.runtime.kernels import BLOCKS, DOMAIN, FORMATS, LORA_INPUT, MATMUL_Q4, TILE


def repack(q: np.ndarray, scales: np.ndarray, k: int, n: int, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' 4-bit weight (N, K/block, block/2) — byte j of a block holds k = 2j in its low nibble, 2j + 1
    in its high one — and its scales (N · K/block) as MatMulQ4's tiles: (N/16, K/block, 8 · block) and
    (N/16, K/block, 16) float16 (runtime/kernels/src/matmul_q4.cc has the layout)."""
    blocks, tiles, vectors = k // block, n // TILE, block // 8
    q = q.reshape(n, blocks, block // 2)
    values = np.empty((n, blocks, block), dtype=np.uint8)
    values[..., 0::2] = q & 0x0F
    values[..., 1::2] = q >> 4
    # (tile, column, block, group of 4 k, j) → (tile, block, group, column, j); groups g and g + block/8 share a byte
    v = values.reshape(tiles, TILE, blocks, block // 4, 4).transpose(0, 2, 3, 1, 4)
    packed = (v[:, :, :vectors] | (v[:, :, vectors:] << 4)).reshape(tiles, blocks, 8 * block)
    tiled_scales = scales.astype(np.float16).reshape(tiles, TILE, blocks).transpose(0, 2, 1)
    return np.ascontiguousarray(packed), np.ascontiguousarray(tiled_scales)


def qualifies(node, initializers: dict) -> bool:
    """A MatMulNBits that MatMulQ4 computes the same way: 4 bits, blocks of 32 or 64, int8 activations, fp32
    scales within float16's range, no zero points, bias or g_idx, K a multiple of the block and N of 16."""
    from onnx import TensorProto, helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scales = initializers.get(node.input[2])
    block = attrs.get("block_size")
    return (
        node.op_type == "MatMulNBits"
        and attrs.get("bits", 4) == 4
        and block in BLOCKS
        and attrs.get("accuracy_level", 0) == 4
        and not any(node.input[3:])
        and attrs["K"] % block == 0
        and attrs["N"] % TILE == 0
        and node.input[1] in initializers
        and scales is not None
        and scales.data_type == TensorProto.FLOAT
        and float(np.abs(numpy_helper.to_array(scales)).max(initial=0)) <= float(np.finfo(np.float16).max)
    )


def write(export_dir: Path, adapters: dict[str, dict]) -> dict | None:
    """model.q4.onnx (+ model.q4.onnx.data) beside the builder graph in `export_dir`, and each adapter's
    .q4.onnx_adapter (`adapters`: export.json's entries); export.json's entry for it, or None when no node
    qualifies."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(export_dir / PORTABLE_GRAPH))
    graph = proto.graph
    by_name = {node.name: node for node in graph.node}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    dropped, added, new_initializers = set(), [], []
    pairs: dict[str, list[tuple]] = {}  # {MatMulQ4 node: [(A input, B input, K, n)] in output order}
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    for node in (node for node in nbits if qualifies(node, initializers)):
        node_inputs, output = [node.input[0], *_repacked(node, initializers, new_initializers)], node.output[0]
        found = find_branches(graph, node, by_name, initializers)
        if found is not None:
            node_inputs.append(LORA_INPUT)
            dropped |= found.nodes
            output = found.output
            pairs[node.name + "/q4"] = found.pairs
        dropped.add(node.name)
        added.append(helper.make_node("MatMulQ4", node_inputs, [output], name=node.name + "/q4", domain=DOMAIN))
    if not added:
        return None
    # the old int4 weights no node reads any more go (a tied head's stays: the shared embedding gathers from it)
    read = {name for node in graph.node if node.name not in dropped for name in node.input}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    slots = swap_nodes(proto, dropped, added, pairs)
    onnx.save(proto, str(export_dir / Q4_GRAPH), save_as_external_data=True, location=Q4_GRAPH + ".data")
    entry = {
        "model_file": Q4_GRAPH,
        "format": FORMATS[MATMUL_Q4],
        "nodes": len(added),
        "matmulnbits_left": len(nbits) - len(added),
        "lora_slots": slots,
        "adapters": {},
    }
    for name, adapter in adapters.items():
        entry["adapters"][name] = {"file": write_adapter(export_dir, adapter["file"], slots)}
    return entry


def _repacked(node, initializers: dict, new_initializers: list) -> tuple[str, str]:
    """MatMulNBits `node`'s weight and scales repacked for MatMulQ4, appended to `new_initializers`; their names."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    packed, scales = repack(
        numpy_helper.to_array(initializers[node.input[1]]),
        numpy_helper.to_array(initializers[node.input[2]]),
        attrs["K"],
        attrs["N"],
        attrs["block_size"],
    )
    w_name, s_name = node.input[1] + "/q4", node.input[2] + "/q4"
    new_initializers += [numpy_helper.from_array(packed, w_name), numpy_helper.from_array(scales, s_name)]
    return w_name, s_name
