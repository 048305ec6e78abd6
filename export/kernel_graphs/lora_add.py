"""A graph beside a builder `adapters` export for edge-lora's portable LoRA op (runtime/kernels, LoraAdd).

The portable graph (model.onnx) adds each projection's LoRA branches as onnxruntime nodes beside its MatMulNBits:
MatMul (x · A) → MatMul (· B) per branch, a Concat for q, k and v's packed product, an Add — 20 nodes a layer of
which each costs onnxruntime a few µs a token, whatever its size (BENCHMARKS.md, Runtime). model.lora.onnx is the
same graph with each projection's branches replaced by one LoraAdd node after its MatMulNBits, reading the same
one LoRA input as MatMulQ4 (export/kernel_graphs/q4.py): a table of every node's pairs in int8, each node finding its slot
by its lora_slot attribute, in the order the nodes run; each adapter gets that input in a file of its own,
adapters/NAME.q4.onnx_adapter, shared with the MatMulQ4 graph where both take the same slots.

The graph's weights are the portable graph's own: model.lora.onnx refers to model.onnx.data, so an export gains
a few hundred KB of graph, not a second copy of its weights. The op is plain C++ that the host's compiler
vectorizes (NEON, AVX2, AVX-512): it is the runtime's choice wherever MatMulQ4 cannot run and a C++ compiler can
build it, an Arm board's or an AVX2 laptop's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_lora.formats import ADAPTER_SUFFIX, KERNEL_ADAPTER_SUFFIX, LORA_GRAPH
from edge_lora.runtime.kernels import DOMAIN, FORMATS, LORA_ADD, LORA_INPUT, lora_blob, lora_blobs, lora_table

LORA_OP = "LoraAdd"


@dataclass
class Branches:
    """A projection's LoRA branches in the portable graph (export/graphs/builder.py writes them)."""

    pairs: list[tuple[str, str, int, int]]  # (A input, B input, K, n) in the order of the product's columns
    nodes: set[str] = field(default_factory=set)  # the branches' nodes: MatMuls, Concat, Add
    output: str = ""  # the Add's output: the projection's output with the branches added


def branches(graph, node, by_name: dict, initializers: dict) -> Branches | None:
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


def external_data_files(proto) -> set[str]:
    """The files a graph's initializers keep their data in (ONNX external data), by their paths in the export."""
    return {entry.value for tensor in proto.graph.initializer if tensor.data_location == tensor.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def attach_lora_input(graph, pairs: dict[str, list[tuple]]) -> list[list]:
    """The graph's nodes put in the order they run and, when `pairs` names any, the graph's one LoRA input (by
    default a table of empty blobs: no adapter), each node of `pairs` given its lora_slot in that order, so that
    the input is read front to back; the slots' pairs in that order (export.json's lora_slots)."""
    from onnx import TensorProto, helper, numpy_helper

    from edge_lora.export.adapters import _topological_sort

    if pairs:
        empty = lora_table([lora_blob([]) for _ in pairs])
        graph.initializer.append(numpy_helper.from_array(empty, LORA_INPUT))
        graph.input.append(helper.make_tensor_value_info(LORA_INPUT, TensorProto.UINT8, ["lora_bytes"]))
    _topological_sort(graph)
    in_order = [node for node in graph.node if node.name in pairs]
    for slot, node in enumerate(in_order):
        node.attribute.append(helper.make_attribute("lora_slot", slot))
    return [[list(pair) for pair in pairs[node.name]] for node in in_order]


def drop_lora_ab(graph, pairs: dict[str, list[tuple]]) -> None:
    """The portable graph's per-branch A and B inputs (and their empty defaults) out of the graph."""
    names = {name for node_pairs in pairs.values() for pair in node_pairs for name in pair[:2]}
    kept_inputs = [value for value in graph.input if value.name not in names]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def write(export_dir: Path, adapters: dict[str, dict], shared: dict | None = None) -> dict | None:
    """model.lora.onnx beside the builder graph in `export_dir`, and each adapter's LoRA input file (`adapters`:
    export.json's entries) unless `shared` (another kernel's export.json entry) has them for the same slots;
    export.json's entry for it, or None when the graph has no LoRA branches."""
    import onnx
    from onnx import helper

    # the weights stay where they are: their external-data references now point from both graphs to one file
    proto = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    graph = proto.graph
    by_name = {node.name: node for node in graph.node}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    dropped, added, pairs = set(), [], {}
    for node in list(graph.node):
        if node.op_type != "MatMulNBits":
            continue
        found = branches(graph, node, by_name, initializers)
        if found is None:
            continue
        dropped |= found.nodes
        name = node.name.rsplit("/", 1)[0] + "/lora/LoraAdd"
        added.append(helper.make_node(LORA_OP, [node.output[0], node.input[0], LORA_INPUT], [found.output], name=name,
                                      domain=DOMAIN))
        pairs[name] = found.pairs
    if not added:
        return None
    drop_lora_ab(graph, pairs)
    nodes = [node for node in graph.node if node.name not in dropped]
    del graph.node[:]
    graph.node.extend(nodes + added)
    slots = attach_lora_input(graph, pairs)
    proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    onnx.save(proto, str(export_dir / LORA_GRAPH))
    entry = {"model_file": LORA_GRAPH, "format": FORMATS[LORA_ADD], "nodes": len(added),
             "data_files": sorted(external_data_files(proto)), "lora_slots": slots, "adapters": {}}
    for name, adapter in adapters.items():
        if shared and shared.get("lora_slots") == slots and name in shared.get("adapters", {}):
            entry["adapters"][name] = dict(shared["adapters"][name])
        else:
            entry["adapters"][name] = {"file": write_adapter(export_dir, adapter["file"], slots)}
    return entry


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
