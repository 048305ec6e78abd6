"""The weight bytes export.json records for each graph (export/graphs/weight_bytes.py), on a tiny torch graph at
every precision and with its weights in external data: equal to what onnx's own arrays hold, an embedding table
read one row a token, through a Reshape too; a file that is not ONNX gets one line naming it."""

import numpy as np
import pytest

from edge_lora.export.graphs.weight_bytes import read_graph_weights, weight_bytes


@pytest.fixture(scope="module")
def graph_variants(tmp_path_factory):
    """model.onnx of a random-weight tiny Llama (hidden 64, vocab 128) written by torch's exporter, at fp32, int4
    (MatMulNBits), int8 and fp16, and at fp32 with every weight in external data."""
    import onnx
    import torch
    from transformers import LlamaForCausalLM

    from edge_lora.export.graphs.portable import export_onnx, quantize
    from edge_lora.tiny import llama_config

    out = tmp_path_factory.mktemp("graphs")
    config = llama_config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    src = export_onnx(LlamaForCausalLM(config).eval(), out / "fp32", opset=18)
    paths = {"fp32": src}
    for precision in ("int4", "int8", "fp16"):
        (out / precision).mkdir()
        quantize(src, out / precision / "model.onnx", precision)
        paths[precision] = out / precision / "model.onnx"
    (out / "external").mkdir()
    onnx.save_model(
        onnx.load(str(src)),
        str(out / "external" / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    paths["external"] = out / "external" / "model.onnx"
    return paths


def onnx_weight_bytes(model_path):
    """weight_bytes and weight_bytes_per_token as onnx reads the graph (external data loaded): every initializer and
    Constant value once, a table that only Gather reads as its data one row, a weight no node reads nothing."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors |= {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant" and n.attribute[0].name == "value"
    }
    uses = {name: [] for name in tensors}
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in uses:
                uses[name].append(node.op_type == "Gather" and position == 0)
    per_token = sum(
        0 if not uses[name] else array.nbytes // array.shape[0] if all(uses[name]) else array.nbytes
        for name, array in tensors.items()
    )
    return {"weight_bytes": sum(a.nbytes for a in tensors.values()), "weight_bytes_per_token": per_token}


@pytest.mark.parametrize("variant", ["fp32", "int4", "int8", "fp16", "external"])
def test_weight_bytes_are_read_from_the_graph_as_onnx_reads_them(graph_variants, variant):
    import onnx

    weights = read_graph_weights(graph_variants[variant])
    assert (
        {"weight_bytes": weights.total_bytes, "weight_bytes_per_token": weights.bytes_per_token}
        == weight_bytes(graph_variants[variant])
        == onnx_weight_bytes(graph_variants[variant])
    )
    # The embedding table, (vocab 128, hidden 64), is read one row per token: fp32 and int4/int8 (which leave Gather
    # alone) store it as fp32, fp16 as fp16.
    itemsize = 2 if variant == "fp16" else 4
    assert weights.row_read == {"model.embed_tokens.weight"} and not weights.unused
    assert weights.total_bytes - weights.bytes_per_token == 127 * 64 * itemsize
    if variant == "int4":  # the packed 4-bit blocks (uint8) and their scales are what the matmuls read
        ops = {n.op_type for n in onnx.load(str(graph_variants[variant])).graph.node}
        assert "MatMulNBits" in ops
        assert weights.bytes_per_token < read_graph_weights(graph_variants["fp32"]).bytes_per_token / 4
    if variant == "external":
        assert graph_variants[variant].stat().st_size < 100_000 < weights.total_bytes


def test_a_table_reached_through_a_reshape_is_read_a_row_per_token(tmp_path):
    """A shared embedding reaches its lookup through a Reshape of the head's weight (the kernel graph keeps the
    original for the Gather, the head reads a repacked copy): one row a token, unless a matmul reads it too."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.ones((100, 4, 2), np.float32), "table")
    shape = numpy_helper.from_array(np.array([100, 8], np.int64), "shape")
    gather = [
        helper.make_node("Reshape", ["table", "shape"], ["flat"]),
        helper.make_node("Gather", ["flat", "ids"], ["y"]),
    ]
    for also_matmul in (False, True):
        nodes = gather + (
            [helper.make_node("MatMul", ["y", "flat_t"], ["z"]), helper.make_node("Transpose", ["flat"], ["flat_t"])]
            if also_matmul
            else []
        )
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
            [helper.make_tensor_value_info("z" if also_matmul else "y", TensorProto.FLOAT, None)],
            [table, shape],
        )
        onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
        weights = read_graph_weights(tmp_path / "m.onnx")
        assert weights.bytes_per_token == (100 * 32 + 16 if also_matmul else 32 + 16), also_matmul


def test_a_file_that_is_not_onnx_raises_saying_so(graph_variants, tmp_path):
    cases = {
        "empty.onnx": b"",
        "text.onnx": b"not an onnx model\n",
        "half.onnx": graph_variants["fp32"].read_bytes()[:200_000],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name} is truncated or not an ONNX model$"):
            read_graph_weights(tmp_path / name)
