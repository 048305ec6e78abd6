"""PyTorch model → ONNX decoder graph with KV cache (torch's own exporter: torch.onnx.export with dynamo), and its
precisions (onnxruntime's quantizers, and a cast to fp16).

The graph's contract, which runtime/generate.py binds: inputs input_ids (batch, seq), attention_mask
(batch, past_seq + seq) and position_ids (batch, seq), all int64, and past_key_values.{i}.key / .value
(batch, kv_heads, past_seq, head_dim); outputs logits (batch, seq, vocab) and present.{i}.key / .value
(batch, kv_heads, past_seq + seq, head_dim). Batch, seq and past_seq are dynamic, past_seq 0 at prefill: one graph
for prefill and decode, a left-padded batch with each row's own positions included.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path

from edge_lora.export.graphs.builder import PAST_NAMES, PRESENT_NAMES
from edge_lora.formats import PORTABLE_GRAPH, PRECISIONS, Precision

# Architectures (config.json model_type) this exporter takes: each is exported, run and checked against
# transformers through prefill and decode in tests/export/test_families.py. Another architecture traces the same
# way if its model takes a DynamicCache, but its graph is unchecked until it has a tiny model there.
MODEL_TYPES = ("gemma", "gpt2", "llama", "mistral", "phi3", "qwen2")
# onnxruntime and protobuf cannot hold a graph over 2 GB in one file: weights go to external data above this.
EXTERNAL_DATA_BYTES = 1 << 30
# The sizes of the traced sample: 2 and up, as torch.export takes a dimension of 0 or 1 for a constant.
SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST = 2, 3, 4
# The node metadata the graph keeps: the module path of the code each node comes from, a Python list literal
# ['', 'model', 'model.layers', …, 'model.layers.0.self_attn.q_proj', 'linear'] that ends with the traced op's name
# (lora_inputs.py finds an adapted layer's MatMul by it). The exporter's other notes on each node (stack trace, FX
# node, class names) are dropped: four fifths of a small graph's file, and the paths of the exporting machine.
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def module_of(node) -> str | None:
    """The path of the module whose code made `node` (an onnx NodeProto of a graph this exporter wrote), read from
    its NAME_SCOPES metadata: 'model.layers.0.self_attn.q_proj'; None for a node without one."""
    import ast

    scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == NAME_SCOPES), [])
    return scopes[-2] if len(scopes) >= 2 else None


def export_onnx(model, out_dir: Path, opset: int) -> Path:
    """model.onnx in `out_dir` (created): the decoder graph of the in-memory transformers `model` with its KV cache
    (the module docstring gives its inputs and outputs). Returns its path."""
    import torch

    sample, dynamic_shapes = sample_inputs(model)
    layers = len(sample["past_key_values"]) // 2
    cache_names = [
        name.format(layer=i, kind=kind)
        for name in (PAST_NAMES, PRESENT_NAMES)
        for i in range(layers)
        for kind in ("key", "value")
    ]
    with quiet_exporter(), flat_forward(model), torch.no_grad():
        program = torch.onnx.export(
            model,
            kwargs=sample,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=["input_ids", "attention_mask", "position_ids", *cache_names[: 2 * layers]],
            output_names=["logits", *cache_names[2 * layers :]],
            opset_version=opset,
            optimize=False,  # simplify() below does what the graph needs of it
            verbose=False,
        )
    simplify(program.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PORTABLE_GRAPH
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    program.save(path, external_data=weights > EXTERNAL_DATA_BYTES)  # external data in model.onnx.data
    return path


def sample_inputs(model) -> tuple[dict, dict]:
    """The inputs the exporter traces `model` with (past_key_values a list: key and value of each layer in turn), and
    their dynamic dimensions. The past's shape is what the model itself caches for one token."""
    import torch

    with torch.no_grad():
        layers = model(input_ids=torch.ones((1, 1), dtype=torch.int64), use_cache=True).cache.layers
    _, kv_heads, _, head_dim = layers[0].keys.shape
    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    past, total = torch.export.Dim("past_sequence_length", min=0), torch.export.Dim("total_sequence_length")
    cache_shape = (SAMPLE_BATCH, kv_heads, SAMPLE_PAST, head_dim)
    sample = {
        "input_ids": torch.ones((SAMPLE_BATCH, SAMPLE_SEQ), dtype=torch.int64),
        "attention_mask": torch.ones((SAMPLE_BATCH, SAMPLE_PAST + SAMPLE_SEQ), dtype=torch.int64),
        "position_ids": torch.arange(SAMPLE_PAST, SAMPLE_PAST + SAMPLE_SEQ).repeat(SAMPLE_BATCH, 1),
        "past_key_values": [torch.zeros(cache_shape, dtype=model.dtype) for _ in range(2 * len(layers))],
    }
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [{0: batch, 2: past}] * (2 * len(layers)),
    }
    return sample, dynamic_shapes


@contextlib.contextmanager
def flat_forward(model):
    """While the exporter traces `model`, its forward takes the graph's inputs as flat tensors (past_key_values a list
    of each layer's key and value in turn) and returns the logits and each layer's grown key and value."""
    from transformers import DynamicCache

    forward, own = model.forward, model.__dict__.get("forward")

    def flat(input_ids, attention_mask, position_ids, past_key_values):
        # A full-length layer each, built without the config: a sliding-window layer would cut present.* to the
        # window, where the runtime hands the whole cache back; the model's mask still applies the window.
        cache = DynamicCache(list(zip(past_key_values[0::2], past_key_values[1::2])))
        out = forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        return out.logits, *(t for layer in out.cache.layers for t in (layer.keys, layer.values))

    model.forward = flat
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def simplify(model) -> None:
    """Constants folded in the exported `model` (an onnx_ir model; its weights' transposes among them), common
    subexpressions merged, unused nodes and node metadata other than NAME_SCOPES dropped: what the graph needs of
    onnxscript's optimizer. Its rewrite rules are left out: at SmolLM2-135M's shape they took 40% of the export's
    time and changed no decode step's time, as onnxruntime's own graph optimizations do the same when a session
    loads the graph."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    common.InlinePass()(model)
    fold_constants(model)
    fold_weight_transposes(model.graph)
    for node in model.graph.all_nodes():
        for key in [k for k in node.metadata_props if k != NAME_SCOPES]:
            del node.metadata_props[key]
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),  # equal constants become one, for the CSE after it to merge their readers
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.NameFixPass(),
    )(model)


def fold_weight_transposes(graph) -> None:
    """Each Transpose of a weight in `graph` (an onnx_ir graph) replaced by a weight holding its result.

    Constant folding transposes a linear layer's weight itself, but not a large one with another reader: a tied
    embedding, whose table the lookup reads as it is and the head transposed. Left in the graph, that Transpose would
    run at every step and keep the head from int4 (which quantizes a MatMul of a constant weight only); folded, the
    table is stored twice, as the head's weight and as the embedding's.
    """
    import onnx_ir as ir

    for node in [n for n in graph if n.op_type == "Transpose" and n.inputs[0].is_initializer()]:
        source, transposed = node.inputs[0], node.outputs[0]
        perm = node.attributes.get_ints("perm")
        array = source.const_value.numpy().transpose(perm)
        name, shape = f"{source.name}.transposed", ir.Shape(array.shape)
        weight = ir.Value(name=name, shape=shape, type=source.type, const_value=ir.tensor(array, name=name))
        graph.register_initializer(weight)
        transposed.replace_all_uses_with(weight)
        graph.remove(node, safe=True)


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's notes kept off the terminal: torchvision ops it skips, the dimension names it merges."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        logger.setLevel(level)


def save_model(model_proto, path: Path) -> None:
    """`model_proto` at `path`, its weights in path.name + ".data" when the graph is over EXTERNAL_DATA_BYTES."""
    import onnx

    big = model_proto.ByteSize() > EXTERNAL_DATA_BYTES if _size_known(model_proto) else True
    onnx.save_model(
        model_proto,
        str(path),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location=path.name + ".data" if big else None,
    )


def _size_known(model_proto) -> bool:
    # ByteSize() itself fails above 2 GB; a proto whose tensors live in external data reports its small size.
    try:
        model_proto.ByteSize()
        return True
    except Exception:
        return False


def head_node(model_proto) -> str | None:
    """The MatMul that computes the logits from the last hidden state (the output head), if there is one."""
    return next((n.name for n in model_proto.graph.node if n.op_type == "MatMul" and "logits" in n.output), None)


def lora_matmuls(model_proto) -> list[str]:
    """The LoRA branches' MatMuls of an `adapters` graph (lora_inputs.add_torch_lora_inputs): their A/B are graph
    inputs with placeholder initializers, which a weight quantizer would otherwise bake into the graph as constants."""
    return [
        n.name
        for n in model_proto.graph.node
        if n.op_type == "MatMul" and ("/lora_A/" in n.name or "/lora_B/" in n.name)
    ]


def quantize(
    src: Path,
    dst: Path,
    precision: Precision,
    int4_block_size: int = 32,
    int4_accuracy_level: int = 4,
    int4_head: bool = True,
) -> None:
    """Write `src` at `precision` to `dst`. fp32 is a copy; the others quantize or cast weights only."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        copy_fp32(src, dst)
        return
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (their imports set INFO levels)

    # onnxruntime's quantizers log every node at INFO, on the root logger and their own; keep the terminal readable.
    for name in ("", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if precision == "int4":
        quantize_int4(src, dst, int4_block_size, int4_accuracy_level, int4_head)
    elif precision == "int8":
        quantize_int8(src, dst)
    else:
        cast_fp16(src, dst)


def copy_fp32(src: Path, dst: Path) -> None:
    import onnx

    if src.stat().st_size > EXTERNAL_DATA_BYTES:
        save_model(onnx.load(str(src)), dst)  # one big file: its weights go to external data
        return
    # The files as the exporter wrote them (a load and save would re-serialise every weight: seconds at 135M);
    # an external data file keeps its name, which the graph refers to.
    for file in src.parent.glob(src.name + "*"):
        shutil.copy2(file, dst.parent / (dst.name + file.name[len(src.name) :]))


def quantize_int4(src: Path, dst: Path, block_size: int, accuracy_level: int, int4_head: bool) -> None:
    """Symmetric 4-bit blocks of `block_size` along K for every MatMul with a constant weight, the output head
    included unless `int4_head` is False; accuracy_level 4 lets the CPU kernel quantize activations to int8 on the
    fly."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level)
    model = onnx.load(str(src))
    keep = lora_matmuls(model) + ([] if int4_head else [n for n in [head_node(model)] if n])
    scopes = {n.name: list(n.metadata_props) for n in model.graph.node if n.op_type == "MatMul"}
    quantizer = MatMulNBitsQuantizer(
        model,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        nodes_to_exclude=keep,
        algo_config=config,
    )
    quantizer.process()
    # The quantizer's MatMulNBits (named after the MatMul, + "_Q4") drop the MatMul's module path; keep it, so that a
    # profile can still say which layer and projection a node is.
    for node in quantizer.model.model.graph.node:
        if node.op_type == "MatMulNBits" and not node.metadata_props:
            node.metadata_props.extend(scopes.get(node.name.removesuffix("_Q4"), []))
    save_model(quantizer.model.model, dst)


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8: MatMul weights in int8, activations quantized at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=lora_matmuls(onnx.load(str(src), load_external_data=False)),
        use_external_data_format=src.with_name(src.name + "_data").exists(),
    )


def cast_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types=False: the KV cache inputs and outputs become fp16 too, halving the cache's bytes.
    save_model(convert_float_to_float16(onnx.load(str(src)), keep_io_types=False), dst)
