"""Quantization and LoRA options reach bitsandbytes and PEFT, and the adapter reloads with PEFT as written."""

import json

import pytest
import torch

from edge_lora.config import LoraConfig, QuantConfig, TrainConfig
from edge_lora.errors import UsageError


def short_run(base_dir, train_path, output, **fields):
    from edge_lora.trainer import train

    config = TrainConfig(model=str(base_dir), data=str(train_path), output=str(output), max_steps=3, batch_size=8,
                         learning_rate=2e-3, log_every=1, **fields)
    return train(config, show_progress=False)


@pytest.mark.parametrize("fields", [
    {"quant": QuantConfig(quant_type="fp4", double_quant=False)},
    {"lora": LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=("q_proj", "v_proj"))},
    {"lora": LoraConfig(r=4, use_dora=True)},
    {"quant": QuantConfig(compute_dtype="float16")},
], ids=["fp4-no-double-quant", "rslora-q-v", "dora", "fp16-loss-scaled"])
def test_options_are_applied_and_reload_with_peft(base_dir, task_files, tmp_path, fields):
    from peft import PeftModel

    from edge_lora.export.reference import qlora_model
    from edge_lora.modeling import load_quantized_base

    out = short_run(base_dir, task_files[0], tmp_path / "a", **fields)
    manifest = json.loads((out / "edge_lora.json").read_text())
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    quant, lora = fields.get("quant", QuantConfig()), fields.get("lora", LoraConfig())
    assert manifest["quantization"]["type"] == quant.quant_type
    assert manifest["quantization"]["double_quant"] == quant.double_quant
    assert adapter_config["r"] == lora.r and adapter_config["use_rslora"] == lora.use_rslora
    assert adapter_config["use_dora"] == lora.use_dora
    if lora.target_modules != ("all-linear",):
        assert set(adapter_config["target_modules"]) == set(lora.target_modules)
    reference = qlora_model(out, base_dir, manifest)
    peft_model = PeftModel.from_pretrained(load_quantized_base(base_dir, quant), out).eval()
    ids = torch.tensor([[1, 20, 21, 22]])
    with torch.no_grad():
        # fp16 compute: the reference computes in fp32 (same weights), PEFT's load here in fp16
        tolerance = 5e-2 if quant.compute_dtype == "float16" else 0
        torch.testing.assert_close(peft_model(ids).logits.float(), reference(ids).logits, rtol=0, atol=tolerance)
    # every 4-bit layer, adapted or not, goes into the merged export dequantized: the fp32 gate holds
    from edge_lora.export import export

    parity = json.loads((export(out, tmp_path / "x", show_progress=False) / "export.json").read_text())["parity"]["merged"]
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-3


def test_unknown_target_module_lists_the_linear_layers(base_dir, task_files, tmp_path):
    with pytest.raises(UsageError, match=r"lora.target_modules: qkv not among this model's linear layers — choose from "
                                         r"down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        short_run(base_dir, task_files[0], tmp_path / "b", lora=LoraConfig(target_modules=("qkv",)))


def test_eval_fraction_holds_out_samples(base_dir, task_files, tmp_path):
    out = short_run(base_dir, task_files[0], tmp_path / "c", eval_fraction=0.25)
    manifest = json.loads((out / "edge_lora.json").read_text())
    assert manifest["data"]["eval_split"] == {"fraction": 0.25, "samples": 64}
    assert manifest["metrics"]["eval_loss"] > 0
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
