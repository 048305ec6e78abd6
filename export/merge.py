"""Merging LoRA adapters into base weights: pure functions on tensors, every path through `lora_delta`."""

from __future__ import annotations

from typing import Literal

import torch

MergeInto = Literal["dequantized", "original"]


class MergeError(ValueError):
    """A merge produced non-finite weights, or the adapter does not fit the base."""


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The weight change of one adapter, in fp32: B (out, r) @ A (r, in) * scaling.

    `fan_in_fan_out` layers (GPT-2's Conv1D) store their weight as (in, out), so the delta is transposed to match.
    """
    delta = (lora_b.float() @ lora_a.float()) * scaling  # (out, in)
    return delta.T if fan_in_fan_out else delta


def dequantized_weight(layer) -> torch.Tensor:
    """The fp32 weight a bitsandbytes 4-bit layer computes with (the NF4/FP4 codes times their block scales)."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()


def base_weight(layer, original: torch.Tensor | None) -> torch.Tensor:
    """fp32 base weight of a PEFT LoRA layer's base, in the layout of the base model's parameter: the given
    original weight, or the dequantized 4-bit one."""
    if original is not None:
        return original.float()
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        weight = dequantized_weight(layer)  # (out, in), whatever layer it was made from
        return weight.T if made_from_conv1d(layer) else weight
    return layer.weight.detach().float()


def made_from_conv1d(layer) -> bool:
    """Whether transformers made this 4-bit layer from a Conv1D (GPT-2): it then quantized the weight transposed
    to (out, in), while the model's parameter of that name is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    source = getattr(layer, "source_cls", None)  # set by transformers' bitsandbytes integration
    return source is not None and issubclass(source, Conv1D)


def stored_in_out(module) -> bool:
    """Whether the base parameter a PEFT LoRA layer merges into is stored (in, out).

    PEFT sets `fan_in_fan_out` when it wraps a Conv1D itself, but a 4-bit layer made from a Conv1D is an
    ordinary (out, in) Linear4bit to PEFT (fan_in_fan_out False): the layout of the model's own parameter
    has to be read from the 4-bit layer.
    """
    return bool(module.fan_in_fan_out) or made_from_conv1d(module.get_base_layer())


def merged_weights(peft_model, original_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{base parameter name: merged fp32 weight} for every LoRA layer of the active adapter, each weight in the
    layout of the base model's parameter of that name (a GPT-2 Conv1D's (in, out) too).

    With `original_state` (the base's full-precision state dict) the deltas go onto those weights; without it,
    onto the dequantized 4-bit weights the adapter was trained against. Nothing in the model is changed, so
    this is safe to call at any time and any number of times.
    """
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapter = module.active_adapters[0]
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter):
            raise MergeError(f"{name}: DoRA adapters cannot be merged by this version of edge-lora yet — train without use_dora")
        key = base_param_name(name)
        base = base_weight(module.get_base_layer(), None if original_state is None else original_state[key])
        # Both terms in the layout of the base parameter, so that the result can replace it as it is.
        delta = lora_delta(module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach(),
                           module.scaling[adapter], stored_in_out(module))
        if delta.shape != base.shape:
            raise MergeError(f"{name}: adapter delta shape {tuple(delta.shape)} does not fit the base weight {tuple(base.shape)}")
        weight = base + delta
        if not torch.isfinite(weight).all():
            raise MergeError(f"{name}: merging adapter {adapter!r} gives non-finite weights — the adapter is broken (NaN/inf in A or B)")
        merged[key] = weight
    return merged


def base_param_name(peft_module_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj.weight'."""
    prefix = "base_model.model."
    name = peft_module_name[len(prefix):] if peft_module_name.startswith(prefix) else peft_module_name
    return name + ".weight"
