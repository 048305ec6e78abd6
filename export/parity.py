"""The parity gate: the ONNX model must compute what the trained PyTorch model computes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Gates by precision: (max |Δlogit| allowed or None, minimum greedy agreement).
GATES = {
    "fp32": (1e-3, 1.0),
    # fp16 rounds every activation to 11 bits of mantissa; logits drift by ~1e-2, so only greedy agreement gates.
    "fp16": (None, 0.95),
    "int8": (None, 0.90),
    "int4": (None, 0.90),
}
GREEDY_TOKENS = 64
FALLBACK_PROMPTS = ("The quick brown fox", "edge-lora exports", "1 2 3 4", "Hello, world!")


@dataclass(frozen=True)
class ParityReport:
    precision: str
    prompts: int
    max_abs_logit_diff: float
    """Over every position of each prompt and of the ONNX model's greedy continuation of it."""
    mean_abs_logit_diff: float
    greedy_agreement: float
    """Fraction of the ONNX model's greedy tokens (up to 64, or to its end-of-sequence token) that the PyTorch
    reference also ranks first, fed the same tokens before them."""
    greedy_prefix_agreement: float
    """Fraction of those tokens before the first one the reference would not have chosen: where the two models'
    own greedy runs part."""
    passed: bool
    gate: dict

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def sequence_logits(model, ids: list[int]):
    """The PyTorch model's logits (seq, vocab) over one sequence, as float32 numpy."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def check(reference_model, generator, prompts: list[str], precision: str) -> ParityReport:
    """The ONNX model generates greedily from each prompt (one batch, as it runs on the device); then both models
    read prompt + continuation in one pass each. Their logits are compared at every position, and at each
    generated position the reference's first choice against the token the ONNX model chose.

    Teacher-forcing the reference on the ONNX model's tokens, rather than letting it generate its own, costs one
    forward pass instead of 64 generation steps (the slowest part of an export when it generated), checks the
    text the export will actually produce, and finds the first divergence of the two greedy runs all the same:
    up to it, both runs are the same tokens.
    """
    from edge_lora.runtime import SamplingConfig

    max_diff, diffs, agree, prefix, total = 0.0, [], 0, 0, 0
    prompt_ids = [generator.encode_prompt(prompt) for prompt in prompts]
    runs = generator.generate_batch(prompt_ids, SamplingConfig(max_new_tokens=GREEDY_TOKENS))
    for ids, run in zip(prompt_ids, runs):
        tokens, sequence = np.array(run.token_ids), ids + run.token_ids
        ref_logits = sequence_logits(reference_model, sequence)
        diff = np.abs(generator.logits(sequence) - ref_logits)
        max_diff = max(max_diff, float(diff.max()))
        diffs.append(float(diff.mean()))
        chosen = ref_logits[len(ids) - 1 : -1].argmax(-1) == tokens  # position t's argmax against token t+1
        agree += int(chosen.sum())
        prefix += int(np.argmin(chosen)) if not chosen.all() else len(tokens)
        total += len(tokens)
    max_allowed, min_agreement = GATES[precision]
    greedy = agree / total
    passed = greedy >= min_agreement and (max_allowed is None or max_diff <= max_allowed)
    return ParityReport(
        precision=precision, prompts=len(prompts), max_abs_logit_diff=max_diff,
        mean_abs_logit_diff=float(np.mean(diffs)), greedy_agreement=greedy, greedy_prefix_agreement=prefix / total,
        passed=passed, gate={"max_abs_logit_diff": max_allowed, "min_greedy_agreement": min_agreement},
    )


TASK_SAMPLES = 32


def task_accuracy(reference_model, generator, tokenizer_dir: Path, samples: list[dict]) -> dict:
    """Held-out exact match of the ONNX model and of the PyTorch reference on the same eval samples, both through
    eval's greedy runner (tokenized with `tokenizer_dir`'s tokenizer.json)."""
    from edge_lora.eval import targets
    from edge_lora.eval.run import exact_match

    samples = samples[:TASK_SAMPLES]
    onnx_target = targets.RuntimeTarget(targets.TargetSpec(generator.export.path, "export"), generator=generator)
    reference = targets.TorchTarget(targets.TargetSpec(tokenizer_dir, "adapter"), model=reference_model)
    longest = max(len(reference.tokenizer.encode(s["completion"], add_special_tokens=False)) for s in samples)
    return {"samples": len(samples), "onnx": exact_match(onnx_target, samples, longest + 2).value,
            "reference": exact_match(reference, samples, longest + 2).value}
