"""Task accuracy: held-out exact match, for a PyTorch model and for an export on the runtime."""

from __future__ import annotations

from dataclasses import dataclass

from edge_lora.eval.metrics import exact


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def torch_exact_match(model, tokenizer, samples: list[dict], max_new_tokens: int, batch_size: int = 64) -> Accuracy:
    """Greedy completions of each prompt, batched with left padding, compared with the expected completion."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct = 0
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            enc = tokenizer([s["prompt"] for s in chunk], return_tensors="pt", padding=True, return_token_type_ids=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(exact(text, s["completion"]) for text, s in zip(texts, chunk))
    finally:
        tokenizer.padding_side = side
    return Accuracy(correct, len(samples))


def runtime_exact_match(generator, samples: list[dict], max_new_tokens: int) -> Accuracy:
    from edge_lora.runtime import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    correct = sum(exact(generator.generate(s["prompt"], sampling).text, s["completion"]) for s in samples)
    return Accuracy(correct, len(samples))
