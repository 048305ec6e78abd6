"""One delta formula for every merge, checked against PEFT's own merge_and_unload."""

import pytest
import torch

from edge_lora.export.merge import MergeError, lora_delta, merged_weights


def tiny_lora_model(seed=0, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edge_lora.tiny import llama_config

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(llama_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero; a zero delta would prove nothing
                p.normal_(std=0.05)
    return model


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_merged_weights_match_peft_merge_and_unload(lora):
    model = tiny_lora_model(**lora)
    ours = merged_weights(model)
    reference = tiny_lora_model(**lora).merge_and_unload().state_dict()
    assert len(ours) == 2 * (4 + 3)  # 2 layers × (q, k, v, o, gate, up, down)
    for name, weight in ours.items():
        torch.testing.assert_close(weight, reference[name], rtol=0, atol=1e-6)


def test_merge_is_pure_and_repeatable():
    model = tiny_lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = merged_weights(model), merged_weights(model)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fan_in_fan_out_transposes_the_delta():
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    torch.testing.assert_close(lora_delta(a, b, 0.5, fan_in_fan_out=True), (b @ a * 0.5).T)


def test_non_finite_merge_names_the_layer():
    model = tiny_lora_model()
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(MergeError, match=r"layers\.1\.mlp\.down_proj: merging adapter 'default' gives non-finite"):
        merged_weights(model)
