"""The parity gate: the ONNX model must compute what the trained PyTorch model computes."""

from __future__ import annotations

from dataclasses import dataclass

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
    mean_abs_logit_diff: float
    greedy_agreement: float
    """Fraction of the reference's greedy tokens (up to 64, or to its end-of-sequence token) that the ONNX model
    also ranks first when fed the reference's tokens."""
    greedy_prefix_agreement: float
    """Fraction of the tokens the ONNX model's own greedy run produces identically before the first divergence."""
    passed: bool
    gate: dict

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def reference_greedy(model, prompts: list[list[int]], n: int, eos_ids: set[int]) -> list[list[int]]:
    """Up to n greedy tokens from the PyTorch model for each prompt, each ending with an end-of-sequence token
    if one comes.

    All prompts go in one left-padded batch (the attention mask hides the padding, positions follow the mask):
    one forward per new token for the whole set instead of one per prompt and token. Tokens after an
    end-of-sequence token are dropped: they are never shown to anyone, and a fine-tuned model's are noise from
    a context it never saw in training; comparing them would gate on noise.
    """
    import torch
    from transformers import GenerationConfig

    width = max(map(len, prompts))
    pad = min(eos_ids) if eos_ids else 0  # any valid id: the mask hides it
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        # A config of its own: a model's generation_config.json may ask for sampling or a repetition penalty
        config = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=pad, eos_token_id=sorted(eos_ids) or None)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    tokens = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        tokens.append(row[:end])
    return tokens


def prompt_logits(model, prompt: list[int]):
    """The PyTorch model's logits (seq, vocab) over one prompt, as float32 numpy."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt])).logits[0].float().numpy()


def check(reference_model, generator, prompts: list[str], precision: str) -> ParityReport:
    from edge_lora.runtime import SamplingConfig

    max_diff, diffs, agree, prefix, total = 0.0, [], 0, 0, 0
    prompt_ids = [generator.encode_prompt(prompt) for prompt in prompts]
    references = reference_greedy(reference_model, prompt_ids, GREEDY_TOKENS, generator.eos_ids)
    # the ONNX model's own greedy runs, batched too (the runtime's batched greedy equals one prompt at a time)
    own_runs = generator.generate_batch(prompt_ids, SamplingConfig(max_new_tokens=GREEDY_TOKENS))
    for ids, ref_tokens, own_run in zip(prompt_ids, references, own_runs):
        ref_logits = prompt_logits(reference_model, ids)
        onnx_logits = generator.logits(ids)
        diff = np.abs(onnx_logits - ref_logits)
        max_diff = max(max_diff, float(diff.max()))
        diffs.append(float(diff.mean()))
        # Teacher-forced: one pass over prompt + reference tokens; position t's argmax should be token t+1.
        forced = generator.logits(ids + ref_tokens)[len(ids) - 1 : -1].argmax(-1)
        agree += int((forced == np.array(ref_tokens)).sum())
        own = own_run.token_ids
        same = next((i for i, (a, b) in enumerate(zip(own, ref_tokens)) if a != b), len(ref_tokens))
        prefix += same
        total += len(ref_tokens)
    max_allowed, min_agreement = GATES[precision]
    greedy = agree / total
    passed = greedy >= min_agreement and (max_allowed is None or max_diff <= max_allowed)
    return ParityReport(
        precision=precision, prompts=len(prompts), max_abs_logit_diff=max_diff,
        mean_abs_logit_diff=float(np.mean(diffs)), greedy_agreement=greedy, greedy_prefix_agreement=prefix / total,
        passed=passed, gate={"max_abs_logit_diff": max_allowed, "min_greedy_agreement": min_agreement},
    )


TASK_SAMPLES = 32


def task_accuracy(reference_model, generator, tokenizer, samples: list[dict]) -> dict:
    """Held-out exact match of the ONNX model and of the PyTorch reference on the same eval samples."""
    from edge_lora.evaluate import runtime_exact_match, torch_exact_match

    samples = samples[:TASK_SAMPLES]
    longest = max(len(tokenizer(s["completion"], add_special_tokens=False)["input_ids"]) for s in samples)
    onnx = runtime_exact_match(generator, samples, longest + 2)
    reference = torch_exact_match(reference_model, tokenizer, samples, longest + 2)
    return {"samples": len(samples), "onnx": onnx.value, "reference": reference.value}
