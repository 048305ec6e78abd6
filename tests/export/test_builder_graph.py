"""The builder graph (ExportOptions(graph="builder")): onnxruntime-genai's model builder writes the merged model as a
fused graph (GroupQueryAttention over a shared KV buffer), the parity gate passes, and the torch-free runtime
generates from it exactly what it generates from torch's graph of the same adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from import_probe import heavy_modules_after
from test_cli import assert_one_line_error, edge_lora

from edge_lora.export.parity import FALLBACK_PROMPTS

# fp32 builder graph against fp32 torch graph of the same merged weights: the same fp32 sums, fused in another order.
FP32_LOGIT_ATOL = 1e-4
# Prompts of different lengths (characters are tokens here), so that a batch pads them.
PROMPTS = [*FALLBACK_PROMPTS, "2024-03-17 ->", "x"]


@pytest.fixture(scope="module")
def builder_fp32(export_fp32):
    """The default export (graph auto) of this Llama: the builder's."""
    return export_fp32


@pytest.fixture(scope="module")
def builder_int4(workdir, adapter_dir):
    """The CPU profile's export (int4, graph auto: the builder, for this Llama), in blocks of 32 rather than the
    profile's 64: this model's rows are 64 wide, one block each, and on prompts it was not trained on (near-tied
    logits) blocks of 64 agree with the fp32 model's greedy tokens 87% of the time, under the 90% gate."""
    out = workdir / "export-builder-int4"
    done = edge_lora(
        "export", adapter_dir, "--output", out, "--device", "cpu-x86-64", "--int4-block-size", "32", "--quiet"
    )
    assert done.returncode == 0, done.stderr
    return out


def test_fp32_export_is_fused_and_passes_parity(builder_fp32):
    import onnx

    manifest = json.loads((builder_fp32 / "export.json").read_text())
    assert manifest["graph"] == "builder" and manifest["kv_cache"]["shared_buffer"] is True
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json"} <= set(manifest["files"])
    assert [i["name"] for i in manifest["inputs"]][:2] == ["input_ids", "attention_mask"]
    parity = manifest["parity"]["merged"]
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-3 and parity["greedy_agreement"] == 1.0
    past = next(i for i in manifest["inputs"] if i["name"] == "past_key_values.0.key")
    assert past["shape"][1::2] == [manifest["kv_cache"]["num_kv_heads"], manifest["kv_cache"]["head_dim"]]
    ops = [n.op_type for n in onnx.load(str(builder_fp32 / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == manifest["kv_cache"]["num_layers"]


def test_device_export_takes_the_profiles_graph_and_passes_parity(builder_int4):
    import onnx

    manifest = json.loads((builder_int4 / "export.json").read_text())
    assert (manifest["graph"], manifest["precision"], manifest["device"]) == ("builder", "int4", "cpu-x86-64")
    parity = manifest["parity"]["merged"]
    assert parity["passed"] and parity["greedy_agreement"] >= 0.9
    nodes = onnx.load(str(builder_int4 / "model.onnx"), load_external_data=False).graph.node
    assert {n.op_type for n in nodes} >= {"MatMulNBits", "GroupQueryAttention"} and "MatMul" not in {
        n.op_type for n in nodes
    }
    assert {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"} == {32}
    # the profile lists edge-lora's int4 kernel: its graph is written beside model.onnx and gated the same way
    # where the exporting host runs it (runtime/kernels: AVX-512 VNNI and a C++ compiler)
    from edge_lora.runtime import kernels

    kernel = manifest["kernels"]["matmul_q4"]
    assert kernel["model_file"] in manifest["files"] and kernel["matmulnbits_left"] == 0
    # export.json records each graph's weight bytes for the profiler, the kernel graph's in its entry
    from edge_lora.export.graphs.weight_bytes import weight_bytes

    for entry in (manifest, kernel):
        assert {key: entry[key] for key in ("weight_bytes", "weight_bytes_per_token")} == weight_bytes(
            builder_int4 / entry["model_file"]
        )
    assert kernel["weight_bytes_per_token"] < kernel["weight_bytes"]
    if kernels.cpu_problem() is None:
        report = kernel["parity"]["merged"]
        assert report["passed"] and abs(report["greedy_agreement"] - parity["greedy_agreement"]) <= 0.1
    else:
        assert "not checked on the exporting host" in kernel["parity"]["skipped"]


@pytest.mark.parametrize(
    ("model_type", "options", "graph"),
    [
        ("llama", {}, "builder"),
        ("qwen2", {"precision": "int4"}, "builder"),
        ("gpt2", {}, "torch"),
        ("phi3", {"precision": "int4"}, "builder"),
        ("gemma", {}, "builder"),
        ("llama", {"flavor": "adapters"}, "builder"),
        ("llama", {"precision": "int8"}, "torch"),
        ("mistral", {"precision": "fp16"}, "torch"),
    ],
)
def test_auto_graph_is_the_builder_where_it_applies(model_type, options, graph):
    from edge_lora.export import ExportOptions
    from edge_lora.export.options import auto_graph

    assert auto_graph(model_type, ExportOptions(graph="auto", **options)) == graph


def test_greedy_and_logits_equal_the_torch_export(builder_fp32, export_torch_fp32):
    from edge_lora import runtime

    fused, portable = runtime.load(builder_fp32), runtime.load(export_torch_fp32)
    assert (fused.graph, portable.graph) == ("builder", "torch")
    sampling = runtime.SamplingConfig(max_new_tokens=24, ignore_eos=True)
    for prompt in PROMPTS:
        ids = fused.encode_prompt(prompt)
        np.testing.assert_allclose(fused.logits(ids), portable.logits(ids), rtol=0, atol=FP32_LOGIT_ATOL)
        assert fused.generate(prompt, sampling).token_ids == portable.generate(prompt, sampling).token_ids, prompt


def test_batch_stream_tokens_stop_and_sampling(builder_fp32):
    from edge_lora import runtime

    g = runtime.load(builder_fp32)
    greedy = runtime.SamplingConfig(max_new_tokens=16, ignore_eos=True)
    alone = [g.generate(p, greedy) for p in PROMPTS]
    # right-padded rows of different lengths decode as they do alone (the head on every prompt position), and so
    # do rows of one length (the head on the last position alone)
    assert [b.token_ids for b in g.generate_batch(PROMPTS, greedy)] == [a.token_ids for a in alone]
    assert [b.token_ids for b in g.generate_batch(PROMPTS[:1] * 3, greedy)] == [alone[0].token_ids] * 3
    assert "".join(g.stream(PROMPTS[0], greedy)) == alone[0].text
    assert [t for t, _ in g.tokens(PROMPTS[0], greedy)] == alone[0].token_ids
    stop = alone[0].text[3:5]
    stopped = g.generate(PROMPTS[0], runtime.SamplingConfig(max_new_tokens=16, ignore_eos=True, stop=(stop,)))
    assert stopped.finish_reason == "stop" and stopped.text == alone[0].text[: alone[0].text.index(stop)]
    sampled = runtime.SamplingConfig(max_new_tokens=16, ignore_eos=True, temperature=1.5, seed=3)
    assert g.generate(PROMPTS[0], sampled).token_ids == g.generate(PROMPTS[0], sampled).token_ids


def test_builder_runtime_is_torch_free(builder_fp32):
    code = (
        "from edge_lora import runtime\n"
        f"g = runtime.load({str(builder_fp32)!r})\n"
        "g.generate('2024-03-17 ->', runtime.SamplingConfig(max_new_tokens=8))"
    )
    assert heavy_modules_after(code) == []


def test_unsupported_architecture_is_one_line(tmp_path, adapter_dir):
    from edge_lora.tiny import build_base_model, tiny_gpt2

    gpt2 = build_base_model(tmp_path / "gpt2", tiny_gpt2())
    done = edge_lora(
        "export", adapter_dir, "--output", tmp_path / "out", "--graph", "builder", "--base", gpt2, "--force"
    )
    assert_one_line_error(done, "'gpt2'", "--graph builder", "supported: llama, mistral, qwen2", "--graph torch")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(precision="int8"), "graph builder writes precision fp32 or int4, got 'int8'"),
        (dict(precision="fp16", flavor="adapters"), "graph builder writes precision fp32 or int4, got 'fp16'"),
    ],
)
def test_builder_refuses_what_it_cannot_write(options, message):
    from edge_lora.errors import UsageError
    from edge_lora.export import ExportOptions

    with pytest.raises(UsageError, match=message):
        ExportOptions(graph="builder", **options)


def prefill_feeds(config, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A builder graph's feeds for a prefill of `ids` with an empty cache."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    empty = np.zeros((1, config.num_key_value_heads, 0, head_dim), dtype=np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)} | {
        f"past_key_values.{i}.{kind}": empty for i in range(config.num_hidden_layers) for kind in ("key", "value")
    }


@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3", "gemma"])
def test_other_families_compute_what_transformers_computes(tmp_path, family):
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from edge_lora.export.graphs.builder import build_graph
    from edge_lora.tiny import FAMILIES, build_base_model

    base = build_base_model(tmp_path / "base", FAMILIES[family]())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    path = build_graph(model, base, tmp_path / "onnx", "fp32", 32, 4, True, ())
    config = model.config
    ids = np.array([[1, 20, 21, 22, 23, 24, 30, 40]])
    feeds = prefill_feeds(config, ids)
    # the cache's shape as the graph declares it: (batch, kv_heads, seq, head_dim), as export.json's kv_cache says
    for value in onnx.load(str(path), load_external_data=False).graph.input:
        if value.name.startswith("past_key_values."):
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims[1::2] == list(feeds[value.name].shape[1::2]), value.name
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    every = session.run(["logits"], feeds | {"logits_start": np.array([0])})[0]
    last = session.run(["logits"], feeds)[0]  # logits_start's default: the head on the last position alone
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(every, expected, rtol=0, atol=FP32_LOGIT_ATOL)
    assert last.shape == (1, 1, config.vocab_size)
    np.testing.assert_allclose(last, expected[:, -1:], rtol=0, atol=FP32_LOGIT_ATOL)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3", "gemma"])
def test_lora_inputs_compute_what_peft_computes(tmp_path, family):
    """The `adapters` flavor's LoRA inputs on each family's builder graph: fed a random adapter of every linear
    layer (Phi-3's fused qkv_proj and gate_up_proj among them), the graph computes PEFT's forward; fed nothing, the
    base model's."""
    import onnxruntime as ort
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edge_lora.export.adapters import adapter_tensors
    from edge_lora.export.graphs.builder import build_graph
    from edge_lora.export.graphs.lora_inputs import add_builder_lora_inputs, lora_modules
    from edge_lora.tiny import FAMILIES, build_base_model

    base = build_base_model(tmp_path / "base", FAMILIES[family]())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    path = build_graph(model, base, tmp_path / "onnx", "fp32", 32, 4, True, ())
    ids = np.array([[1, 20, 21, 22, 23, 24, 30, 40]])
    with torch.no_grad():
        expected_base = model(torch.tensor(ids)).logits.numpy()
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lora).eval()
    add_builder_lora_inputs(path, lora_modules(peft_model), model.config)
    with torch.no_grad():
        expected = peft_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(expected - expected_base).max() > 1e-2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = prefill_feeds(model.config, ids) | {"logits_start": np.array([0])}
    adapted = session.run(["logits"], feeds | adapter_tensors(peft_model, "default"))[0]
    np.testing.assert_allclose(adapted, expected, rtol=0, atol=FP32_LOGIT_ATOL)
    np.testing.assert_allclose(session.run(["logits"], feeds)[0], expected_base, rtol=0, atol=FP32_LOGIT_ATOL)


def test_int4_blocks_that_do_not_divide_the_rows_share_the_embedding(tmp_path):
    """A tied embedding shares the int4 head's blocks even where a row's last block is padded (hidden 64 in blocks of
    128): the builder gathers the padded rows and slices them back to the hidden size. Qwen2: the tied family among
    the tests' tiny models."""
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from edge_lora.export.graphs.builder import HEAD_NODE, build_graph
    from edge_lora.tiny import FAMILIES, build_base_model

    base = build_base_model(tmp_path / "base", FAMILIES["qwen2"]())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.config.hidden_size % 128
    path = build_graph(model, base, tmp_path / "onnx", "int4", 128, 4, True, ())
    nodes = {n.name: n for n in onnx.load(str(path), load_external_data=False).graph.node}
    head, gather = nodes[f"{HEAD_NODE}_Q4"], nodes["/model/embed_tokens/GatherBlockQuantized"]
    assert head.op_type == "MatMulNBits" and nodes["/model/embed_tokens/Reshape"].input[0] == head.input[1]
    assert gather.input[2] == head.input[2] and nodes["/model/embed_tokens/Slice"].input[0] == gather.output[0]
    ids = np.array([[1, 20, 21, 22]])
    feeds = prefill_feeds(model.config, ids)
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits[:, -1:].numpy()
    assert logits.shape == expected.shape and np.isfinite(logits).all()
    assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.9  # int4 rounding, the same model
