"""The `adapters` flavor's graph rewrite: each adapted linear layer y = x @ W becomes y = x @ W + (x @ A) @ B, with A
(in, r) and B (r, out) graph inputs that the active adapter's .onnx_adapter file feeds (export/adapters.py writes
them). A and B default to rank-0 tensors: x @ A is then (…, 0) and (x @ A) @ B is zeros, so with no adapter
active the graph computes the base model.

Both graph kinds take the same branch (lora_branch, add_to_product); they differ in where it goes:
add_torch_lora_inputs finds each module's one MatMul (or Gemm) by the module path torch's exporter records on each
node, add_builder_lora_inputs finds the builder's MatMul or MatMulNBits by layer and role, with q, k and v packed
into one product.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edge_lora.export.graphs.portable import module_of

RANK_DIM = "lora_rank"
BUILDER_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")  # a PEFT target's module name
QKV = ("q_proj", "k_proj", "v_proj")  # the builder packs them, in this order, into one qkv_proj MatMul
PRODUCTS = ("MatMul", "Gemm")  # a linear layer's product: MatMul, or Gemm where its input is 2-D (GPT-2's Conv1D)


def input_names(module: str) -> tuple[str, str]:
    """Graph input names of one layer's A and B: 'model.layers.0.self_attn.q_proj.lora_A', '….lora_B'."""
    return f"{module}.lora_A", f"{module}.lora_B"


def lora_modules(peft_model) -> dict[str, tuple[int, int]]:
    """{base module name: (in_features, out_features)} of every layer any adapter of `peft_model` adapts."""
    from peft.tuners.lora import LoraLayer

    from edge_lora.train.qlora import base_param_name

    return {
        base_param_name(name).removesuffix(".weight"): (layer.in_features, layer.out_features)
        for name, layer in peft_model.named_modules()
        if isinstance(layer, LoraLayer)
    }


def module_products(graph) -> dict[str, list]:
    """{module path: the MatMul and Gemm nodes torch's exporter made in that module's own code} of a graph it wrote."""
    products: dict[str, list] = {}
    for node in graph.node:
        module = module_of(node)
        if node.op_type in PRODUCTS and module:
            products.setdefault(module, []).append(node)
    return products


def add_torch_lora_inputs(model_proto, modules: dict[str, tuple[int, int]]):
    """Give each of `modules` ({module name: (in_features, out_features)}) a LoRA branch fed by graph inputs, on a
    graph of torch's exporter (export/graphs/portable.py), where each linear layer is one MatMul or Gemm whose node
    metadata names the module.

    Modifies and returns `model_proto`. A module without exactly one such node raises ValueError.
    """
    import onnx

    graph = model_proto.graph
    products = module_products(graph)
    new_nodes = []
    for module, (fan_in, fan_out) in sorted(modules.items()):
        nodes = products.get(module, [])
        if len(nodes) != 1:
            raise ValueError(
                f"{module}: {len(nodes)} MatMul or Gemm nodes of that module in the exported graph, expected one"
            )
        branch, delta = lora_branch(graph, module, fan_in, fan_out, nodes[0].input[0], module)
        new_nodes += [*branch, add_to_product(graph, nodes[0], delta, module)]
    graph.node.extend(new_nodes)
    topological_sort(graph)
    onnx.checker.check_model(model_proto)
    return model_proto


def rewrite_torch_graph(graph_path: Path, modules: dict[str, tuple[int, int]]) -> None:
    """The graph of torch's exporter at `graph_path` rewritten in place by add_torch_lora_inputs."""
    import onnx

    from edge_lora.export.graphs.portable import save_model

    save_model(add_torch_lora_inputs(onnx.load(str(graph_path)), modules), graph_path)


def add_builder_lora_inputs(model_path: Path, modules: dict[str, tuple[int, int]], config) -> None:
    """Give each of `modules` ({module name: (in, out)}) a LoRA branch on the builder graph at `model_path`, its A
    and B overridable graph inputs (rank 0, adding zeros, when no adapter feeds them).

    The builder names each projection's MatMul (MatMulNBits at int4, named …/MatMul_Q4) by layer and role, and packs
    q, k and v into one qkv_proj: there the branches of q, k and v are concatenated along the output and added to
    the packed product, so all three get inputs when any of them is adapted (an adapter of q and v leaves k's at
    rank 0). The LoRA MatMuls stay fp32, as in the torch graph's. Only model.onnx is rewritten.
    """
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    graph = proto.graph
    products = {re.sub(r"_Q\d+$", "", n.name): n for n in graph.node if n.op_type in ("MatMul", "MatMulNBits")}
    new_nodes = []
    for scope, parts in _builder_targets(modules, products).items():
        node = products.get(f"{scope}/MatMul")
        if node is None:
            raise ValueError(f"no MatMul for {', '.join(parts)} in the builder graph (looked for {scope}/MatMul)")
        new_nodes += _builder_branches(graph, node, scope, parts, modules, config)
    graph.node.extend(new_nodes)
    topological_sort(graph)
    onnx.save(proto, str(model_path))


def _builder_targets(modules: dict[str, tuple[int, int]], products: dict) -> dict[str, list[str]]:
    """{builder scope: the modules whose branches add to its product, in the product's order}."""
    targets: dict[str, list[str]] = {}
    for module in sorted(modules):
        match = BUILDER_MODULE.fullmatch(module)
        if match is None:
            raise ValueError(
                f"{module}: the builder graph has no place for a LoRA branch there (decoder layers' "
                "attention and MLP projections only)"
            )
        layer, role, proj = match.groups()
        packed = f"/model/layers.{layer}/attn/qkv_proj"
        if proj in QKV and f"{packed}/MatMul" in products:
            targets[packed] = [f"model.layers.{layer}.self_attn.{p}" for p in QKV]
        else:
            targets[f"/model/layers.{layer}/{'attn' if role == 'self_attn' else 'mlp'}/{proj}"] = [module]
    return targets


def _builder_branches(graph, node, scope: str, parts: list[str], modules: dict[str, tuple[int, int]], config) -> list:
    """The nodes that add the branches of `parts` to the builder product `node`: one branch each, a Concat of q, k
    and v's along the output where the product is packed, and the Add."""
    from onnx import helper

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qkv_out = {
        "q_proj": config.num_attention_heads * head_dim,
        "k_proj": config.num_key_value_heads * head_dim,
        "v_proj": config.num_key_value_heads * head_dim,
    }
    new_nodes, deltas = [], []
    for module in parts:
        fan_in, fan_out = modules.get(module) or (config.hidden_size, qkv_out[module.rpartition(".")[2]])
        branch, delta = lora_branch(graph, module, fan_in, fan_out, node.input[0], f"{scope}/{module}")
        new_nodes += branch
        deltas.append(delta)
    if len(deltas) > 1:
        new_nodes.append(helper.make_node("Concat", deltas, [f"{scope}/lora_up"], axis=-1, name=f"{scope}/lora/Concat"))
        deltas = [f"{scope}/lora_up"]
    return new_nodes + [add_to_product(graph, node, deltas[0], scope)]


def lora_branch(graph, module: str, fan_in: int, fan_out: int, x: str, scope: str) -> tuple[list, str]:
    """(x @ A) @ B for one module, A and B graph inputs declared here: its two MatMul nodes and the name of its
    (…, fan_out) output."""
    from onnx import TensorProto, helper, numpy_helper

    a_name, b_name = input_names(module)
    down, up = f"{scope}/lora_down", f"{scope}/lora_up"
    # Overridable initializers: graph inputs whose rank-0 defaults apply when nothing feeds them, so that
    # with no adapter active — or for a layer the active adapter leaves alone — the branch adds zeros.
    # One rank dimension per layer: an adapter may leave some layers at rank 0 while others have rank r, and
    # onnxruntime plans buffers as if equal dimension names meant equal sizes. fp32 here; a later fp16
    # conversion turns these inputs to fp16 with the rest.
    rank = f"{module}.{RANK_DIM}"
    graph.input.extend(
        [
            helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [fan_in, rank]),
            helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [rank, fan_out]),
        ]
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros((fan_in, 0), dtype=np.float32), a_name),
            numpy_helper.from_array(np.zeros((0, fan_out), dtype=np.float32), b_name),
        ]
    )
    return [
        helper.make_node("MatMul", [x, a_name], [down], name=f"{scope}/lora_A/MatMul"),
        helper.make_node("MatMul", [down, b_name], [up], name=f"{scope}/lora_B/MatMul"),
    ], up


def add_to_product(graph, node, delta: str, scope: str):
    """The Add of `delta` to `node`'s output, with every reader of that output rewired to the sum."""
    from onnx import helper

    base_out = node.output[0]
    if any(out.name == base_out for out in graph.output):
        raise ValueError(f"{node.name}'s output is a graph output; cannot add a LoRA branch")
    summed = f"{base_out}/with_lora"
    for consumer in graph.node:
        for i, name in enumerate(consumer.input):
            if name == base_out:
                consumer.input[i] = summed
    return helper.make_node("Add", [base_out, delta], [summed], name=f"{scope}/lora/Add")


def topological_sort(graph) -> None:
    """Reorder nodes so that each comes after the producers of its inputs (ONNX requires it)."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            raise ValueError("the graph has a cycle or an input nobody produces")
        for n in ready:
            ordered.append(n)
            produced.update(n.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)
