"""A projection's LoRA branches in the portable graph, as both kernel graphs take them over: found beside each
MatMulNBits (export/graphs/lora_inputs.py writes them), dropped with their per-branch A and B inputs, and replaced
by one LoRA input, a table of every kernel node's int8 pairs in which each node finds its slot by its lora_slot
attribute, in the order the nodes run. Each adapter gets that input in a file of its own,
adapters/NAME.q4.onnx_adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_lora.export.graphs.lora_inputs import topological_sort
from edge_lora.formats import ADAPTER_SUFFIX, KERNEL_ADAPTER_SUFFIX
from edge_lora.runtime.kernels import DOMAIN, LORA_INPUT, lora_blob, lora_blobs, lora_table


@dataclass
class Branches:
    """A projection's LoRA branches in the portable graph."""

    pairs: list[tuple[str, str, int, int]]  # (A input, B input, K, n) in the order of the product's columns
    nodes: set[str] = field(default_factory=set)  # the branches' nodes: MatMuls, Concat, Add
    output: str = ""  # the Add's output: the projection's output with the branches added


def find_branches(graph, node, by_name: dict, initializers: dict) -> Branches | None:
    """The LoRA branches beside MatMulNBits `node`, None when it has none."""
    from onnx import helper

    scope = node.name.rsplit("/", 1)[0]
    add = by_name.get(f"{scope}/lora/Add")
    if add is None:
        return None
    k = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "K")
    ups = [c for c in graph.node if c.name.startswith(scope + "/") and c.name.endswith("/lora_B/MatMul")]
    found = Branches(pairs=[], nodes={add.name}, output=add.output[0])
    concat = by_name.get(f"{scope}/lora/Concat")
    if concat is not None:  # q, k and v: in the Concat's order, their order in the packed output
        order = {name: i for i, name in enumerate(concat.input)}
        ups.sort(key=lambda c: order[c.output[0]])
        found.nodes.add(concat.name)
    for up in ups:
        down = by_name[up.name.replace("/lora_B/", "/lora_A/")]
        if down.input[0] != node.input[0]:
            raise ValueError(f"{down.name} reads {down.input[0]}, not {node.name}'s input")
        found.nodes |= {up.name, down.name}
        width = initializers[up.input[1]].dims[1]  # B's default (0, n)
        found.pairs.append((down.input[1], up.input[1], k, width))
    return found


def swap_nodes(proto, dropped: set[str], added: list, pairs: dict[str, list[tuple]]) -> list[list]:
    """`proto`'s graph with the nodes named in `dropped` replaced by the kernel nodes `added`, the per-branch A and
    B inputs of `pairs` ({kernel node: its branches' pairs}) replaced by the one LoRA input, and the kernels' domain
    imported; the slots' pairs in the order the nodes run (export.json's lora_slots)."""
    from onnx import helper

    graph = proto.graph
    drop_lora_ab(graph, pairs)
    nodes = [node for node in graph.node if node.name not in dropped]
    del graph.node[:]
    graph.node.extend(nodes + added)
    slots = attach_lora_input(graph, pairs)
    proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return slots


def drop_lora_ab(graph, pairs: dict[str, list[tuple]]) -> None:
    """The portable graph's per-branch A and B inputs (and their empty defaults) out of the graph."""
    names = {name for node_pairs in pairs.values() for pair in node_pairs for name in pair[:2]}
    kept_inputs = [value for value in graph.input if value.name not in names]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def attach_lora_input(graph, pairs: dict[str, list[tuple]]) -> list[list]:
    """The graph's nodes put in the order they run and, when `pairs` names any, the graph's one LoRA input (by
    default a table of empty blobs: no adapter), each node of `pairs` given its lora_slot in that order, so that
    the input is read front to back; the slots' pairs in that order (export.json's lora_slots)."""
    from onnx import TensorProto, helper, numpy_helper

    if pairs:
        empty = lora_table([lora_blob([]) for _ in pairs])
        graph.initializer.append(numpy_helper.from_array(empty, LORA_INPUT))
        graph.input.append(helper.make_tensor_value_info(LORA_INPUT, TensorProto.UINT8, ["lora_bytes"]))
    topological_sort(graph)
    in_order = [node for node in graph.node if node.name in pairs]
    for slot, node in enumerate(in_order):
        node.attribute.append(helper.make_attribute("lora_slot", slot))
    return [[list(pair) for pair in pairs[node.name]] for node in in_order]


def write_adapter(export_dir: Path, file: str, slots: list[list]) -> str:
    """The LoRA-input form of the adapter at export_dir/file (fp32 A and B by graph input) beside it; its relative
    path."""
    import onnxruntime as ort

    params = ort.AdapterFormat.read_adapter(str(export_dir / file)).get_parameters()
    # OrtValue.ortvalue_from_numpy wraps without copying: the blobs stay alive until the file is written
    blobs = lora_blobs({name: value.numpy() for name, value in params.items()}, slots)
    out = file.removesuffix(ADAPTER_SUFFIX) + KERNEL_ADAPTER_SUFFIX
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(blob) for name, blob in blobs.items()})
    fmt.export_adapter(str(export_dir / out))
    return out
