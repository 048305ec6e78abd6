"""How the next token is chosen: the sampling settings of one request, and the functions that apply them to logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Truncate = Literal["none", "left"]


class PromptError(ValueError):
    """A request the model cannot take: a prompt too long for its context or empty, or bad sampling settings."""


@dataclass(frozen=True)
class SamplingConfig:
    """How one generation runs: when it stops, how each token is picked, and how a long prompt is fitted."""

    max_new_tokens: int = 64
    """Stop after this many new tokens."""
    temperature: float = 0.0
    """0 is greedy; above 0 samples from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities sum to top_p."""
    seed: int | None = None
    """Seed of the sampler, for repeatable samples."""
    ignore_eos: bool = False
    """Generate past the model's end-of-sequence tokens (benchmarks force max_new_tokens this way); stop_token_ids
    and stop strings still end a generation."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on every token already in the prompt or the output (1: off; 1.1 to 1.3 are usual)."""
    stop: tuple[str, ...] = ()
    """Strings that end the generation; the text returned or streamed ends before the first one."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the generation, besides the model's end-of-sequence tokens."""
    truncate: Truncate = "none"
    """A prompt too long for the context: "none" refuses it, "left" drops its start so that the prompt plus
    max_new_tokens fit."""

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 disables it)")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop={self.stop!r} must be a tuple of non-empty strings, for example ('\\n\\n',)")
        if isinstance(self.stop_token_ids, (str, int)) or not all(
            isinstance(t, int) and t >= 0 for t in self.stop_token_ids
        ):
            problems.append(f"stop_token_ids={self.stop_token_ids!r} must be a tuple of token ids >= 0")
        if self.truncate not in ("none", "left"):
            problems.append(f"truncate={self.truncate!r} must be one of none, left")
        if problems:
            raise PromptError("; ".join(problems))


def penalize_repetition(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Logits (vocab,) with CTRL's repetition penalty (Keskar et al. 2019) on the tokens where `seen` (vocab,
    bool) is set, as transformers' RepetitionPenaltyLogitsProcessor applies it: a positive logit is divided by
    `penalty`, a negative one multiplied, so that a penalty above 1 always makes the token less likely."""
    if penalty == 1:
        return logits
    penalized = np.where(logits < 0, logits * penalty, logits / penalty)
    return np.where(seen, penalized, logits).astype(logits.dtype)


def pick(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> int:
    """Next token from one row of logits (vocab,): greedy, or temperature, then top-k, then top-p, in
    transformers' order."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits / sampling.temperature
    if sampling.top_k:
        kth = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < sampling.top_p  # always keeps the most likely token
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
