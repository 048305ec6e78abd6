"""Hand-offs end to end on a tiny model: QLoRA training → adapter dir → merged ONNX → torch-free runtime."""

import json
import shutil

import numpy as np
import pytest
import torch

from edge_lora.errors import UsageError
from edge_lora.formats import AdapterManifest

# fp32 ONNX against the 4-bit + LoRA PyTorch model: the same fp32 arithmetic in another order of operations.
FP32_LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def reference(adapter_dir, base_dir):
    from edge_lora.train.reference import qlora_model

    return qlora_model(adapter_dir, base_dir, AdapterManifest.load(adapter_dir))


def test_adapter_dir_is_peft_loadable_and_matches_training_model(adapter_dir, base_dir, reference):
    from peft import PeftModel

    from edge_lora.train.config import QuantConfig
    from edge_lora.train.qlora import load_quantized_base

    # PEFT's load computing in fp32, as the reference does (auto would pick bf16 on a CPU with it): equal to the bit.
    fp32 = QuantConfig(compute_dtype="float32")
    manifest = json.loads((adapter_dir / "edge_lora.json").read_text())
    assert {"base_fingerprint", "quantization", "lora", "training", "data", "metrics", "versions"} <= manifest.keys()
    assert manifest["quantization"]["type"] == "nf4" and manifest["quantization"]["block_size"] == 64
    assert manifest["base_fingerprint"]["num_tensors"] > 0
    peft_model = PeftModel.from_pretrained(load_quantized_base(base_dir, fp32), adapter_dir).eval()
    ids = torch.tensor([[1, 20, 21, 22, 23]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    metrics = [json.loads(line) for line in (adapter_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(10, manifest["training"]["max_steps"] + 1, 10))
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_lora_changed_the_model(adapter_dir, reference):
    ids = torch.tensor([[1, 20, 21, 22, 23]])
    with torch.no_grad():
        trained = reference(ids).logits
        with reference.disable_adapter():
            base = reference(ids).logits
    assert (trained - base).abs().max() > 1e-2


def test_fp32_export_logits_match_pytorch(export_fp32, reference):
    from edge_lora import runtime

    generator = runtime.load(export_fp32)
    for ids in ([1, 20, 21, 22], list(range(1, 40))):  # two lengths: the sequence axis is dynamic
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(generator.logits(ids), expected, rtol=0, atol=FP32_LOGIT_ATOL)
    parity = json.loads((export_fp32 / "export.json").read_text())["parity"]["merged"]
    assert parity["passed"] and parity["greedy_agreement"] == 1.0 and parity["max_abs_logit_diff"] <= 1e-3
    task = parity["task_accuracy"]  # the adapter's manifest names an eval set
    assert task["samples"] == 16 and task["onnx"] == task["reference"]


def test_runtime_greedy_equals_transformers_generate(export_fp32, reference, eval_samples):
    from transformers import AutoTokenizer

    from edge_lora import runtime

    tokenizer = AutoTokenizer.from_pretrained(export_fp32)
    generator = runtime.load(export_fp32)
    for sample in eval_samples[:4]:
        ids = tokenizer(sample["prompt"], return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            expected = reference.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[
                0, ids["input_ids"].shape[1] :
            ]
        ours = generator.generate(sample["prompt"], runtime.SamplingConfig(max_new_tokens=12))
        assert ours.token_ids == expected.tolist()[: len(ours.token_ids)]
        assert "".join(generator.stream(sample["prompt"], runtime.SamplingConfig(max_new_tokens=12))) == ours.text


def test_int4_export_is_smaller_and_passes_its_gate(export_fp32, export_int4):
    def size(d):
        return sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("model.onnx"))

    manifest = json.loads((export_int4 / "export.json").read_text())
    assert manifest["precision"] == "int4" and manifest["parity"]["merged"]["passed"]
    assert size(export_int4) < 0.5 * size(export_fp32)
    import onnx

    ops = {n.op_type for n in onnx.load(str(export_int4 / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops


def test_export_json_lists_files_and_kv_layout(export_fp32):
    from edge_lora.runtime.package import sha256_file

    manifest = json.loads((export_fp32 / "export.json").read_text())
    assert set(manifest["files"]) >= {"model.onnx", "tokenizer.json"}
    for name, digest in manifest["files"].items():
        assert sha256_file(export_fp32 / name) == digest
    assert manifest["kv_cache"]["num_layers"] == 2 and manifest["kv_cache"]["num_kv_heads"] == 2
    names = {i["name"] for i in manifest["inputs"]}
    assert {"input_ids", "past_key_values.0.key", "past_key_values.1.value"} <= names


def test_altered_export_is_refused(export_fp32, tmp_path):
    from edge_lora import runtime

    copy = shutil.copytree(export_fp32, tmp_path / "copy")
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(runtime.ExportError, match=r"tokenizer.json sha256 .* differs from export.json's"):
        runtime.load(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(runtime.ExportError, match=r"model.onnx is missing"):
        runtime.load(copy)
    with pytest.raises(runtime.ExportError, match=r"is not an export: no export.json"):
        runtime.load(tmp_path)


def test_export_refuses_existing_output_and_leaves_nothing_behind(adapter_dir, export_fp32):
    from edge_lora.export import export

    with pytest.raises(UsageError, match=r"already exists — choose another --output or pass --overwrite"):
        export(adapter_dir, export_fp32, show_progress=False)
    assert not [p for p in export_fp32.parent.iterdir() if ".tmp-" in p.name]


def test_prompt_over_context_and_unknown_provider(export_fp32):
    from edge_lora import runtime

    generator = runtime.load(export_fp32)
    with pytest.raises(
        runtime.PromptError, match=r"prompt of 300 tokens \+ max_new_tokens 8 exceeds the context of 256"
    ):
        generator.generate([5] * 300, runtime.SamplingConfig(max_new_tokens=8))
    with pytest.raises(
        runtime.ProviderError, match=r"'NopeExecutionProvider' does not exist — available here: .*CPUExecutionProvider"
    ):
        runtime.load(export_fp32, providers=["NopeExecutionProvider"])


def test_sampling_is_seeded(export_fp32):
    from edge_lora import runtime

    generator = runtime.load(export_fp32)
    sampling = runtime.SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    first, second = generator.generate("2024 ->", sampling), generator.generate("2024 ->", sampling)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 10


def test_the_gate_generates_with_an_exact_fp32_twin(export_fp32):
    # On a CPU bitsandbytes computes a 4-bit layer as dequantize-then-fp32-matmul: the twin is bit-identical.
    record = json.loads((export_fp32 / "export.json").read_text())["parity_reference"]
    assert record["model"].startswith("fp32 twin") and record["twin_max_abs_logit_diff"] == 0.0
