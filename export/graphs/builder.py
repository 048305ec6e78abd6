"""Merged PyTorch model → fused ONNX decoder graph, written by onnxruntime-genai's model builder.

The builder writes a few nodes a layer (MatMulNBits or MatMul with q, k and v packed, GroupQueryAttention with
the rotary embedding inside, SkipSimplifiedLayerNormalization) where torch's exporter writes chains of shape ops
for RoPE, the causal mask, repeat-kv and the KV Concat; it decodes faster (BENCHMARKS.md, Runtime). Its graph's
GroupQueryAttention reads and writes the KV cache in place in one max-length buffer per layer, which
runtime/cache.py binds as both past and present.

The head runs on the last position alone unless asked for more (head_on_last_position): a prompt's prefill needs
the logits of its last token only, and the head is the model's widest matrix (vocab × hidden), which would
otherwise run once for every prompt position.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

from edge_lora.errors import UsageError
from edge_lora.formats import LOGITS_START, PORTABLE_GRAPH

# Architectures (config.json model_type) whose builder graph the runtime drives with input_ids, attention_mask and
# past/present KV alone (the builder's Llama-family classes), each checked against transformers' forward in
# tests/export/test_builder_graph.py: Llama end to end; Mistral, Qwen2 (q/k/v biases, tied embeddings), Phi-3 (fused
# projections) and Gemma (embedding scale, (1 + weight) norms, head_dim apart from hidden / heads) by their logits,
# with and without LoRA inputs.
MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3", "gemma")
# Builder options of one architecture. Phi-3's gate and up projections are one module, gate_up_proj, which PEFT
# adapts as one: the builder keeps them one MatMul (then a Split) so that a LoRA branch has one product to add to.
FAMILY_OPTIONS = {"phi3": {"fuse_mlp_gate_up": "true"}}
PRECISIONS = ("fp32", "int4")
GENAI_CONFIG = "genai_config.json"
HEAD_NODE = "/lm_head/MatMul"  # the builder's name for the head's MatMul, as its nodes_to_exclude takes it
# The inputs and outputs runtime/cache.py binds; a builder graph with any other (position_ids, inputs_embeds, ...)
# is refused at export rather than failing on the device.
PAST_NAMES = "past_key_values.{layer}.{kind}"
PRESENT_NAMES = "present.{layer}.{kind}"


def check_supported(model_type: str | None, model_dir: Path) -> None:
    """One line naming the architectures the builder path takes, for any other."""
    if model_type not in MODEL_TYPES:
        raise UsageError(
            f"{model_dir}: architecture {model_type!r} cannot be exported with --graph builder — "
            f"supported: {', '.join(MODEL_TYPES)}; use --graph torch for it"
        )


def build_graph(
    model,
    tokenizer_dir: Path,
    out_dir: Path,
    precision: str,
    int4_block_size: int,
    int4_accuracy_level: int,
    int4_head: bool,
    hf_files: tuple[str, ...],
) -> Path:
    """Write the builder's graph of the in-memory `model` (fp32, merged) into `out_dir`: model.onnx with its weights
    in model.onnx.data, genai_config.json, and `hf_files` as transformers saves them (the model's configs, the
    tokenizer of `tokenizer_dir`), as the torch graph's export writes them beside its graph. Returns the model path.

    The builder reads an HF dir, so the model is saved to a temporary one first. At int4 its round-to-nearest
    quantizer ("rtn") writes symmetric blocks of `int4_block_size`, with no zero points. A tied embedding is shared
    with the head: at fp32 one matrix, at int4 the head's int4 blocks read by GatherBlockQuantized (rows whose last
    block is padded are sliced back to the hidden size).
    """
    from transformers import AutoTokenizer

    options = {"hf_token": "false", "hf_remote": "false", "filename": PORTABLE_GRAPH}
    options |= FAMILY_OPTIONS.get(model.config.model_type, {})
    if precision == "int4":
        options |= {"block_size": int4_block_size, "accuracy_level": int4_accuracy_level, "algo_config": "rtn"}
        if not int4_head:
            options["nodes_to_exclude"] = HEAD_NODE
    with tempfile.TemporaryDirectory(prefix="edge-lora-builder-") as tmp:
        hf_dir, cache_dir, built = Path(tmp) / "hf", Path(tmp) / "cache", Path(tmp) / "onnx"
        model.save_pretrained(hf_dir)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(hf_dir)
        run_builder(hf_dir, built, cache_dir, precision, options)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (PORTABLE_GRAPH, PORTABLE_GRAPH + ".data", GENAI_CONFIG):
            shutil.move(built / name, out_dir / name)
        for name in hf_files:
            if (hf_dir / name).exists():
                shutil.copy2(hf_dir / name, out_dir / name)
    head_on_last_position(out_dir / PORTABLE_GRAPH)
    check_signature(out_dir / PORTABLE_GRAPH, model.config.num_hidden_layers)
    pin_cache_width(out_dir / PORTABLE_GRAPH, model.config.num_hidden_layers)
    return out_dir / PORTABLE_GRAPH


def run_builder(hf_dir: Path, out_dir: Path, cache_dir: Path, precision: str, options: dict) -> None:
    """onnxruntime_genai.models.builder's parse_extra_options (the KEY=VALUE options of its command line, and the HF
    dir's config and tokenizer) then create_model, in this process, their prints and logs kept off the terminal (it
    reports every node it quantizes); they are shown if it fails."""
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its import sets INFO levels)
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    for name in ("", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    log = io.StringIO()
    kv_pairs = [f"{key}={value}" for key, value in options.items()]
    try:
        with head_by_identity(), output_into(log):
            prepared = parse_extra_options(None, str(hf_dir), str(out_dir), precision, "cpu", str(cache_dir), kv_pairs)
            create_model(None, str(hf_dir), str(out_dir), precision, "cpu", str(cache_dir), **prepared)
    except Exception as e:
        raise RuntimeError(f"onnxruntime-genai's model builder failed: {e}\n{log.getvalue()[-4000:]}") from e


@contextlib.contextmanager
def output_into(log: io.StringIO):
    """Prints and log records go to `log` while the builder runs: the root logger's handlers (onnxruntime's
    quantizer gives it one on the terminal's stderr when imported) are swapped for one on `log`."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers[:] = [logging.StreamHandler(log)]
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        root.handlers[:] = handlers


@contextlib.contextmanager
def head_by_identity():
    """While the builder runs, only the model's own output embedding counts as its LM head.

    The builder (0.18, builders/base.py `has_lm_head`) takes every nn.Linear with vocab_size outputs for the head, so
    a model whose MLP is as wide as its vocabulary (the tests' tiny Llama: intermediate 128, vocab 128) gets its head
    rebuilt from each layer's gate and up projections, and logits off by units. The models edge-lora exports are
    transformers ones, whose get_output_embeddings() names the head.
    """
    from builders.base import Model  # onnxruntime_genai.models puts its builders/ on sys.path

    builder_rule = Model.has_lm_head
    Model.has_lm_head = lambda self, module: module is self.weights.get_output_embeddings()
    try:
        yield
    finally:
        Model.has_lm_head = builder_rule


def head_on_last_position(model_path: Path) -> None:
    """Put Slice(hidden, start=logits_start, axis 1) in front of the head; logits_start is an overridable
    initializer (an initializer listed as a graph input), so a session run that does not bind it gets its default,
    -1, and the logits of the last position only, and one that binds [0] gets them at every position, as the
    parity gate and perplexity need.

    onnxruntime runs every node of a graph whatever outputs a run asks for, so a second head output for all
    positions would cost as much as the unpruned head; and the builder's own prune_lm_head (0.18) gathers position
    -1 with a constant, which leaves no way to get the logits of every position, nor of each row's own last token
    in a right-padded batch (runtime/cache.py asks for all positions then). Only model.onnx is rewritten: its
    weights stay in model.onnx.data, where the external-data references point.
    """
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(model_path), load_external_data=False)
    graph = proto.graph
    at, head = next((i, n) for i, n in enumerate(graph.node) if "logits" in n.output)
    hidden, sliced = head.input[0], f"{head.input[0]}/{LOGITS_START}"
    graph.initializer.extend(
        [
            helper.make_tensor(LOGITS_START, TensorProto.INT64, [1], [-1]),
            helper.make_tensor(f"{LOGITS_START}/end", TensorProto.INT64, [1], [2**63 - 1]),
            helper.make_tensor(f"{LOGITS_START}/axis", TensorProto.INT64, [1], [1]),
        ]
    )
    graph.input.append(helper.make_tensor_value_info(LOGITS_START, TensorProto.INT64, [1]))
    slice_inputs = [hidden, LOGITS_START, f"{LOGITS_START}/end", f"{LOGITS_START}/axis"]
    graph.node.insert(at, helper.make_node("Slice", slice_inputs, [sliced], name=f"/lm_head/{LOGITS_START}"))
    head.input[0] = sliced
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "logits_length"
    onnx.save(proto, str(model_path))


def cache_names(num_layers: int) -> tuple[set[str], set[str]]:
    """The names of the KV-cache inputs and of the outputs, each layer's key and value."""
    kinds = [(i, kind) for i in range(num_layers) for kind in ("key", "value")]
    past = {PAST_NAMES.format(layer=i, kind=k) for i, k in kinds}
    return past, {PRESENT_NAMES.format(layer=i, kind=k) for i, k in kinds}


def pin_cache_width(model_path: Path, num_layers: int) -> None:
    """The last dimension of each KV-cache input and output set to the head size the builder wrote the graph for
    (genai_config.json's decoder.head_size, beside it).

    The builder (0.18) names that dimension kv_cache_dim, a symbol, so that one graph can also take a quantized
    cache of another width; edge-lora's cache is float, one head wide, as export.json's kv_cache says and the graph
    now declares. Only model.onnx is rewritten."""
    import onnx

    genai = json.loads((model_path.parent / GENAI_CONFIG).read_text())
    head_size = genai["model"]["decoder"]["head_size"]
    proto = onnx.load(str(model_path), load_external_data=False)
    past, present = cache_names(num_layers)
    for value in (*proto.graph.input, *proto.graph.output):
        if value.name in past | present:
            width = value.type.tensor_type.shape.dim[3]
            if width.dim_value not in (0, head_size):
                raise RuntimeError(f"{model_path}: {value.name} is {width.dim_value} wide, not {head_size}")
            width.dim_value = head_size  # clears dim_param, its other member
    onnx.save(proto, str(model_path))


def check_signature(model_path: Path, num_layers: int) -> None:
    """The graph has the inputs and outputs runtime/cache.py binds, or the builder changed: fail the export."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    past, present = cache_names(num_layers)
    expected_in = {"input_ids", "attention_mask", LOGITS_START, *past}
    expected_out = {"logits", *present}
    got_in, got_out = {v.name for v in graph.input}, {v.name for v in graph.output}
    if got_in != expected_in or got_out != expected_out:
        raise RuntimeError(
            f"{model_path}: the builder wrote inputs {sorted(got_in)} and outputs {sorted(got_out)}, "
            f"not the {sorted(expected_in)} → {sorted(expected_out)} the runtime binds"
        )
    if not any(n.op_type == "GroupQueryAttention" for n in graph.node):
        raise RuntimeError(
            f"{model_path}: the builder wrote no GroupQueryAttention, whose shared KV buffer the runtime relies on"
        )


# What export.json's kv_cache says beside the shape (the rest is as for a torch graph).
KV_CACHE = {
    "layout": "(batch, kv_heads, max_length, head_dim): one buffer per layer and kind, bound as past and "
    "present at once; GroupQueryAttention writes each new position in place",
    "shared_buffer": True,
}
