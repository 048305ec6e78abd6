"""Quantization and LoRA options reach bitsandbytes and PEFT, and the adapter reloads with PEFT as written."""

import dataclasses
import json

import pytest
import torch

from edge_lora.errors import UsageError
from edge_lora.formats import AdapterManifest
from edge_lora.train.config import LoraConfig, QuantConfig, TrainConfig


def short_run(base_dir, train_path, output, **fields):
    from edge_lora.train.loop import train

    config = TrainConfig(
        model=str(base_dir),
        data=str(train_path),
        output=str(output),
        max_steps=3,
        batch_size=8,
        learning_rate=2e-3,
        log_every=1,
        **fields,
    )
    return train(config, show_progress=False)


@pytest.mark.parametrize(
    "fields",
    [
        {"quant": QuantConfig(quant_type="fp4", double_quant=False)},
        {"lora": LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=("q_proj", "v_proj"))},
        {"lora": LoraConfig(r=4, use_dora=True)},
        {"quant": QuantConfig(compute_dtype="float16")},
        {"quant": QuantConfig(block_size=128)},
    ],
    ids=["fp4-no-double-quant", "rslora-q-v", "dora", "fp16-loss-scaled", "block-128"],
)
def test_options_are_applied_and_reload_with_peft(base_dir, task_files, tmp_path, fields):
    from peft import PeftModel

    from edge_lora.train.qlora import load_quantized_base
    from edge_lora.train.reference import qlora_model

    out = short_run(base_dir, task_files[0], tmp_path / "a", **fields)
    manifest = json.loads((out / "edge_lora.json").read_text())
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    quant, lora = fields.get("quant", QuantConfig()), fields.get("lora", LoraConfig())
    assert manifest["quantization"]["type"] == quant.quant_type
    assert manifest["quantization"]["double_quant"] == quant.double_quant
    assert manifest["quantization"]["block_size"] == quant.block_size
    assert adapter_config["r"] == lora.r and adapter_config["use_rslora"] == lora.use_rslora
    assert adapter_config["use_dora"] == lora.use_dora
    if lora.target_modules != ("all-linear",):
        assert set(adapter_config["target_modules"]) == set(lora.target_modules)
    reference = qlora_model(out, base_dir, AdapterManifest.load(out))
    # PEFT's load computes in fp32 as the reference does (auto would pick bf16 on a CPU with it), except for the
    # fp16 case, loaded as trained: fp16 logits against fp32 ones
    load_quant = quant if quant.compute_dtype == "float16" else dataclasses.replace(quant, compute_dtype="float32")
    peft_model = PeftModel.from_pretrained(load_quantized_base(base_dir, load_quant), out).eval()
    ids = torch.tensor([[1, 20, 21, 22]])
    with torch.no_grad():
        tolerance = 5e-2 if quant.compute_dtype == "float16" else 0
        torch.testing.assert_close(peft_model(ids).logits.float(), reference(ids).logits, rtol=0, atol=tolerance)
    # every 4-bit layer, adapted or not, goes into the merged export dequantized: the fp32 gate holds
    from edge_lora.export import export

    parity = json.loads((export(out, tmp_path / "x", show_progress=False) / "export.json").read_text())["parity"][
        "merged"
    ]
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights are stored (in, out)
def test_block_size_quantizes_from_the_original_weights(tmp_path, family):
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from edge_lora.tiny import FAMILIES, build_base_model
    from edge_lora.train.qlora import load_quantized_base

    base = build_base_model(tmp_path / family, FAMILIES[family]())
    original = load_file(base / "model.safetensors")
    model = load_quantized_base(
        base, QuantConfig(block_size=256, compute_dtype="float32")
    )  # bf16 would quantize bf16-cast weights
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for name, module in layers:
        state = module.weight.quant_state
        assert state.blocksize == 256
        weight = original.get(
            f"{name}.weight", original.get(f"{name.removeprefix(model.base_model_prefix + '.')}.weight")
        )
        weight = weight.T if family == "gpt2" else weight
        codes, expected = bnb.functional.quantize_4bit(
            weight.float().contiguous(), blocksize=256, quant_type="nf4", compress_statistics=True
        )
        assert torch.equal(module.weight.data, codes), name  # the same 4-bit codes as quantizing the original


def test_block_size_1024_is_refused_on_a_cpu(base_dir):
    from edge_lora.train.qlora import load_quantized_base

    with pytest.raises(UsageError, match="quant.block_size=1024 dequantizes wrongly in bitsandbytes' CPU kernel"):
        load_quantized_base(base_dir, QuantConfig(block_size=1024))


def test_unknown_block_size_names_the_allowed_ones():
    with pytest.raises(UsageError, match=r"quant.block_size=100 is not one of 32, 64, 128"):
        QuantConfig(block_size=100)


def test_unknown_target_module_lists_the_linear_layers(base_dir, task_files, tmp_path):
    with pytest.raises(
        UsageError,
        match=r"lora.target_modules: qkv not among this model's linear layers — choose from "
        r"down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    ):
        short_run(base_dir, task_files[0], tmp_path / "b", lora=LoraConfig(target_modules=("qkv",)))


def test_eval_fraction_holds_out_samples(base_dir, task_files, tmp_path):
    out = short_run(base_dir, task_files[0], tmp_path / "c", eval_fraction=0.25)
    manifest = json.loads((out / "edge_lora.json").read_text())
    assert manifest["data"]["eval_split"] == {"fraction": 0.25, "samples": 64}
    assert manifest["metrics"]["eval_loss"] > 0
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_auto_picks_bf16_on_a_cpu_that_has_it():
    from edge_lora.train.qlora import compute_dtype, cpu_has_bf16

    expected = torch.bfloat16 if cpu_has_bf16() else torch.float32
    assert compute_dtype(QuantConfig()) == expected


def test_bf16_training_keeps_fp32_lora_weights_and_follows_fp32(base_dir, task_files, tmp_path):
    """bf16 trains the same adapter as fp32 up to bf16's rounding: fp32 LoRA weights saved, the frozen
    norms and embeddings in bf16 while training (mixed_precision), the losses within 1% of fp32's."""
    from safetensors.torch import load_file

    from edge_lora.train.qlora import add_lora, load_quantized_base, mixed_precision

    model = add_lora(load_quantized_base(base_dir, QuantConfig(compute_dtype="bfloat16")), LoraConfig())
    autocast = mixed_precision(model, torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in params.items() if "lora_" in n)
    assert all(p.dtype in (torch.bfloat16, torch.uint8) for n, p in params.items() if "lora_" not in n)
    with autocast:
        loss = model(torch.tensor([[1, 20, 21, 22]]), labels=torch.tensor([[1, 20, 21, 22]])).loss
    loss.backward()  # the fp32 LoRA weights get fp32 gradients through the bf16 activations
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in params.items() if "lora_B" in n)

    runs = {
        dtype: short_run(base_dir, task_files[0], tmp_path / dtype, quant=QuantConfig(compute_dtype=dtype))
        for dtype in ("bfloat16", "float32")
    }
    losses = {
        dtype: [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        for dtype, out in runs.items()
    }
    assert len(losses["bfloat16"]) == 3
    for bf16, fp32 in zip(losses["bfloat16"], losses["float32"]):
        assert abs(bf16 - fp32) <= 1e-2 * fp32
    manifest = json.loads((runs["bfloat16"] / "edge_lora.json").read_text())
    assert manifest["quantization"]["compute_dtype"] == "bfloat16"
    adapter = load_file(runs["bfloat16"] / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values())


def test_lora_summed_in_place_computes_what_peft_does(base_dir, monkeypatch):
    """sum_lora_in_place's forward (no clone, the LoRA term added in place) gives PEFT's loss and gradients, and
    PEFT's own forward is not called for vanilla LoRA."""
    from peft.tuners.lora.bnb import Linear4bit

    from edge_lora.train.qlora import add_lora, load_quantized_base, sum_lora_in_place

    model = add_lora(load_quantized_base(base_dir, QuantConfig(compute_dtype="float32")), LoraConfig(dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would make the LoRA term vanish
                param.normal_(0, 0.05)
    ids = torch.tensor([[1, 20, 21, 22, 23, 24]])

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    peft_loss, peft_grads = loss_and_grads()
    calls = []
    original = Linear4bit.forward
    monkeypatch.setattr(Linear4bit, "forward", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    sum_lora_in_place(model)
    loss, grads = loss_and_grads()
    assert calls == []
    assert loss == pytest.approx(peft_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-5, atol=1e-7)
