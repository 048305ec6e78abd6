"""Flavor `adapters`: one base graph whose LoRA A/B weights are graph inputs, and one `.onnx_adapter` file per
adapter (onnxruntime's AdapterFormat), so that adapters trained on one base share one base model on a device.

Each adapted linear layer y = x @ W becomes y = x @ W + (x @ A) @ B, with A (in, r) and B (r, out) = (B_peft *
scaling)ᵀ fed by the active adapter. A and B default to rank-0 tensors: x @ A is then (…, 0) and (x @ A) @ B
is zeros, so with no adapter active the graph computes the base model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


RANK_DIM = "lora_rank"


def input_names(module: str) -> tuple[str, str]:
    """Graph input names of one layer's A and B: 'model.layers.0.self_attn.q_proj.lora_A', '….lora_B'."""
    return f"{module}.lora_A", f"{module}.lora_B"


def scope_name(module: str) -> str:
    """The ONNX node scope torch gives a module: 'model.layers.0.self_attn.q_proj' -> '/model/layers.0/self_attn/q_proj'
    (a ModuleList index stays joined to its list's name)."""
    return "/" + re.sub(r"\.(?!\d+(\.|$))", "/", module)


def add_lora_inputs(model_proto, modules: dict[str, tuple[int, int]]):
    """Give each of `modules` ({module name: (in_features, out_features)}) a LoRA branch fed by graph inputs, on a
    graph of optimum's exporter (one MatMul per module, named by its torch scope).

    Modifies and returns `model_proto`. A module whose MatMul is missing from the graph raises ValueError.
    """
    import onnx

    graph = model_proto.graph
    by_name = {node.name: node for node in graph.node}
    new_nodes = []
    for module, (fan_in, fan_out) in sorted(modules.items()):
        node = by_name.get(f"{scope_name(module)}/MatMul")
        if node is None:
            raise ValueError(f"no MatMul node for {module} (looked for {scope_name(module)}/MatMul) in the exported graph")
        branch, delta = lora_branch(graph, module, fan_in, fan_out, node.input[0], scope_name(module))
        new_nodes += [*branch, add_to_product(graph, node, delta, scope_name(module))]
    graph.node.extend(new_nodes)
    _topological_sort(graph)
    onnx.checker.check_model(model_proto)
    return model_proto


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
    graph.input.extend([
        helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [fan_in, rank]),
        helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [rank, fan_out]),
    ])
    graph.initializer.extend([
        numpy_helper.from_array(np.zeros((fan_in, 0), dtype=np.float32), a_name),
        numpy_helper.from_array(np.zeros((0, fan_out), dtype=np.float32), b_name),
    ])
    return [helper.make_node("MatMul", [x, a_name], [down], name=f"{scope}/lora_A/MatMul"),
            helper.make_node("MatMul", [down, b_name], [up], name=f"{scope}/lora_B/MatMul")], up


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


def _topological_sort(graph) -> None:
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


def adapter_tensors(peft_model, adapter: str, dtype=np.float32) -> dict[str, np.ndarray]:
    """{graph input name: value} of one adapter: Aᵀ (in, r) and (B · scaling)ᵀ (r, out) per adapted layer."""
    from peft.tuners.lora import LoraLayer

    from edge_lora.export.merge import MergeError
    from edge_lora.train.qlora import base_param_name

    tensors = {}
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter):
            raise MergeError(f"{name}: DoRA adapters cannot be kept apart (their magnitudes rescale the base weight) — export them with --flavor merged")
        a_name, b_name = input_names(base_param_name(name).removesuffix(".weight"))
        a = layer.lora_A[adapter].weight.detach().float()  # (r, in)
        b = layer.lora_B[adapter].weight.detach().float() * layer.scaling[adapter]  # (out, r)
        tensors[a_name] = a.T.contiguous().numpy().astype(dtype)
        tensors[b_name] = b.T.contiguous().numpy().astype(dtype)
    return tensors


def write_adapter(tensors: dict[str, np.ndarray], path: Path) -> Path:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in tensors.items()})
    fmt.export_adapter(str(path))
    return path
