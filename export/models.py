"""The PyTorch models an export starts from: the trained model (the 4-bit base with every adapter, the reference
the parity gate checks against) and the full-precision model whose weights the graph gets, merged or base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_lora.export.inputs import ExportInputs
from edge_lora.export.merge import merged_weights
from edge_lora.export.options import ExportOptions
from edge_lora.export.parity import reference_prompt_ids
from edge_lora.formats import AdapterManifest


@dataclass
class Models:
    reference: object
    """The trained model: the 4-bit base (or a foreign full-precision LoRA's base) with every adapter (PEFT), the
    first one active."""
    model: object
    """The full-precision model holding the graph's weights."""
    merge_report: dict
    """export.json's "merge": where the weights were merged and, merged, how close each choice comes."""


def load_models(inputs: ExportInputs) -> Models:
    """The trained model and the full-precision one with the graph's weights in it."""
    from edge_lora.train.reference import base_dtype, full_precision_base, qlora_model

    reference = qlora_model(inputs.dirs, inputs.model_dir, inputs.manifests[0], inputs.names)
    # the original weights as training held them: the checkpoint itself, or a foreign full-precision LoRA's base
    # rounded to its training dtype (bf16, fp16)
    model = full_precision_base(inputs.model_dir, base_dtype(inputs.manifests[0]))
    merge_report = load_weights(model, reference, inputs.options, inputs.manifests[0], inputs.tokenizer_dir)
    return Models(reference=reference, model=model, merge_report=merge_report)


def load_weights(model, reference, options: ExportOptions, manifest: AdapterManifest, tokenizer_dir: Path) -> dict:
    """Put into the full-precision `model` what the graph should hold; returns the merge report.

    merged: the base (dequantized 4-bit or original) plus the adapter's delta. The report gives the logit error
    of both merge choices against the trained model, so a user sees which is closer and by how much.
    adapters: the base alone, as the adapters were trained against it (dequantized) or the original weights.
    """
    import numpy as np
    import torch

    from edge_lora.train.qlora import dequantized_weights
    from edge_lora.train.reference import held_in_4bit

    original = {k: v.clone() for k, v in model.state_dict().items()}
    if options.flavor == "adapters":
        weights = dequantized_weights(reference) if options.merge_into == "dequantized" else {}
        with torch.no_grad():
            for name, weight in weights.items():
                model.get_parameter(name).copy_(weight)
        return {"into": options.merge_into}
    prompts = [torch.tensor([ids]) for ids in reference_prompt_ids(tokenizer_dir, manifest)]
    errors = {}
    with torch.no_grad():
        expected = [reference(ids).logits for ids in prompts]
        # the other choice first, so that the chosen one is what stays in the model
        # a full-precision base (a foreign LoRA's) has no dequantized weights: "original" is the one choice
        choices = ("dequantized", "original") if held_in_4bit(manifest) else ("original",)
        for into in sorted(choices, key=lambda c: c == options.merge_into):
            model.load_state_dict(original)
            for name, weight in merged_weights(reference, original if into == "original" else None).items():
                model.get_parameter(name).copy_(weight)
            diffs = [(model(ids).logits - ref).abs() for ids, ref in zip(prompts, expected)]
            errors[into] = {
                "max_abs_logit_diff": float(max(d.max() for d in diffs)),
                "mean_abs_logit_diff": float(np.mean([d.mean().item() for d in diffs])),
            }
    return {"into": options.merge_into, "vs_trained_model": errors}
