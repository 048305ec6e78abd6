"""Merging LoRA adapters into base weights: pure functions on tensors, every path through `lora_delta`."""

from __future__ import annotations

from typing import Literal

import torch

from edge_lora.errors import UsageError
from edge_lora.train.qlora import base_param_name, dequantized_weights, made_from_conv1d

MergeInto = Literal["dequantized", "original"]


class MergeError(UsageError):
    """A merge produced non-finite weights, or the adapter does not fit the base: the adapter is bad input."""


def lora_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """The weight change of one adapter, in fp32: B (out, r) @ A (r, in) * scaling.

    `fan_in_fan_out` layers (GPT-2's Conv1D) store their weight as (in, out), so the delta is transposed to match.
    """
    delta = (lora_b.float() @ lora_a.float()) * scaling  # (out, in)
    return delta.T if fan_in_fan_out else delta


def stored_in_out(module) -> bool:
    """Whether the base parameter a PEFT LoRA layer merges into is stored (in, out).

    PEFT sets `fan_in_fan_out` when it wraps a Conv1D itself, but a 4-bit layer made from a Conv1D is an
    ordinary (out, in) Linear4bit to PEFT (fan_in_fan_out False): the layout of the model's own parameter
    has to be read from the 4-bit layer.
    """
    return bool(module.fan_in_fan_out) or made_from_conv1d(module.get_base_layer())


def merged_weights(peft_model, original_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{base parameter name: fp32 weight} to load into the full-precision base for the active adapter, each in
    the layout of the base model's parameter of that name (a GPT-2 Conv1D's (in, out) too).

    With `original_state` (the base's full-precision state dict) the deltas go onto those weights and only the
    adapted layers are returned; without it, every 4-bit layer is returned dequantized — the weights the adapter
    was trained against — with the deltas added to the adapted ones. Nothing in the model is changed, so this
    is safe to call at any time and any number of times.
    """
    from peft.tuners.lora import LoraLayer

    merged = {} if original_state is not None else dequantized_weights(peft_model)
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapter = module.active_adapters[0]
        if adapter not in module.lora_A:
            continue
        key = base_param_name(name)
        in_out = stored_in_out(module)
        if original_state is not None:
            base = original_state[key].float()
        else:  # a 4-bit layer's dequantized weight, or the layer's own weight where the base is not quantized
            base = merged.get(key, module.get_base_layer().weight.detach()).float()
        # Both terms in the layout of the base parameter, so that the result can replace it as it is.
        delta = lora_delta(
            module.lora_A[adapter].weight.detach(),
            module.lora_B[adapter].weight.detach(),
            module.scaling[adapter],
            in_out,
        )
        if delta.shape != base.shape:
            raise MergeError(
                f"{name}: adapter delta shape {tuple(delta.shape)} does not fit the base weight {tuple(base.shape)}"
            )
        weight = base + delta
        if module.use_dora.get(adapter):
            # DoRA: each output's weight vector is rescaled to its learned magnitude, m · (W + ΔW) / ‖W + ΔW‖.
            out_axis = 0 if in_out else 1
            magnitude = module.lora_magnitude_vector[adapter].weight.detach().float()
            scale = magnitude / weight.norm(p=2, dim=out_axis)
            weight = weight * (scale.unsqueeze(0) if in_out else scale.unsqueeze(1))
        if not torch.isfinite(weight).all():
            raise MergeError(
                f"{name}: merging adapter {adapter!r} gives non-finite weights — the adapter is broken "
                "(NaN/inf in its tensors)"
            )
        merged[key] = weight
    return merged
