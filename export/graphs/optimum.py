"""PyTorch model → ONNX decoder graph with KV cache (optimum's exporter), and its precisions."""

from __future__ import annotations

import shutil
from pathlib import Path

from edge_lora.formats import PORTABLE_GRAPH, PRECISIONS, Precision

# onnxruntime and protobuf cannot hold a graph over 2 GB in one file: weights go to external data above this.
EXTERNAL_DATA_BYTES = 1 << 30


def supported_model_types() -> list[str]:
    """Architectures (config.json model_type) optimum can export as a decoder with KV cache."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (importing it registers the architectures)
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(task="text-generation-with-past", exporter="onnx"))


def export_onnx(model, out_dir: Path, opset: int) -> Path:
    """One graph for prefill and decode: inputs input_ids, attention_mask, position_ids and
    past_key_values.{i}.key/value (batch, kv_heads, past_seq, head_dim); outputs logits and present.{i}.*.
    Batch and sequence are dynamic."""
    from optimum.exporters.onnx import onnx_export_from_model

    # optimum's own validation runs the graph against the model; edge-lora's parity gate does that better
    # (against the trained 4-bit model, not the merged copy), so it is skipped here.
    onnx_export_from_model(
        model, out_dir, opset=opset, task="text-generation-with-past", do_validation=False, no_post_process=True
    )
    return out_dir / PORTABLE_GRAPH


def save_model(model_proto, path: Path) -> None:
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
    """The LoRA branches' MatMuls of an `adapters` graph (lora_inputs.add_optimum_lora_inputs): their A/B are graph
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
    import logging

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
    quantizer = MatMulNBitsQuantizer(
        model,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        nodes_to_exclude=keep,
        algo_config=config,
    )
    quantizer.process()
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
