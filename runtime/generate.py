"""Token generation on an onnxruntime session of a decoder graph with KV cache inputs and outputs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edge_lora.runtime.package import ExportDir
from edge_lora.runtime.tokenizer import StreamDecoder, TextTokenizer


class PromptError(ValueError):
    """A prompt the model cannot take (too long for its context, empty)."""


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked from the logits."""

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
    """Generate exactly max_new_tokens (benchmarks force this)."""

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
        if problems:
            raise PromptError("; ".join(problems))


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    """"stop" (an end-of-sequence token) or "length" (max_new_tokens reached)."""
    ttft_s: float
    """Prompt in, first new token out: prefill plus one sampling step."""
    token_times_s: list[float] = field(default_factory=list)
    """Time of each later token after the one before it."""

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.token_times_s)
        return len(self.token_times_s) / total if total > 0 else float("nan")


class Generator:
    """Runs prefill and decode on one session; the KV cache is handed from each step's outputs to the next."""

    def __init__(self, export: ExportDir, session, tokenizer: TextTokenizer, adapters: dict | None = None):
        self.export = export
        self.session = session
        self.tokenizer = tokenizer
        kv = export.manifest["kv_cache"]
        self.num_layers = kv["num_layers"]
        self.kv_shape = (kv["num_kv_heads"], kv["head_dim"])
        self.context_length = kv["context_length"]
        self.eos_ids = set(export.manifest["eos_token_ids"])
        self._inputs = {i.name for i in session.get_inputs()}
        self._outputs = [o.name for o in session.get_outputs()]
        self._dtype = np.float16 if export.manifest["precision"] == "fp16" else np.float32
        self.adapters = adapters or {}
        """Loaded adapters by name (onnxruntime LoraAdapter, memory-mapped)."""
        self.adapter: str | None = None
        self._run_options = None

    def with_adapter(self, name: str | None) -> Generator:
        """A generator on the same session and memory-mapped adapters with `name` active (None: the base model).

        Switching costs no reload: the adapter's tensors are fed as graph inputs on each run.
        """
        import copy

        import onnxruntime as ort

        if name is not None and name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none (this export has no adapters)"
            raise PromptError(f"unknown adapter {name!r} — known adapters: {known}")
        view = copy.copy(self)
        view.adapter, view._run_options = name, None
        if name is not None:
            view._run_options = ort.RunOptions()
            view._run_options.add_active_adapter(self.adapters[name])
        return view

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_shape[0], 0, self.kv_shape[1])  # (batch, kv_heads, seq, head_dim)
        empty = np.zeros(shape, dtype=self._dtype)
        return {f"past_key_values.{i}.{kind}": empty for i in range(self.num_layers) for kind in ("key", "value")}

    def forward(self, ids: np.ndarray, past: dict[str, np.ndarray], start: int) -> tuple[np.ndarray, dict]:
        """Logits (batch, seq, vocab) for `ids` (batch, seq) at positions start.., and the grown cache."""
        batch, seq = ids.shape
        feeds = {"input_ids": ids, **past}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = np.ones((batch, start + seq), dtype=np.int64)
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(start, start + seq, dtype=np.int64), (batch, seq))
        outputs = self.session.run(self._outputs, feeds, self._run_options)
        named = dict(zip(self._outputs, outputs))
        present = {
            f"past_key_values.{i}.{kind}": named[f"present.{i}.{kind}"]
            for i in range(self.num_layers) for kind in ("key", "value")
        }
        return named["logits"], present

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits (seq, vocab) of one sequence in a single prefill, as float32."""
        logits, _ = self.forward(np.array([ids], dtype=np.int64), self._empty_cache(1), 0)
        return logits[0].astype(np.float32)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise PromptError("the prompt is empty — give at least one token of text")
        return ids

    def tokens(self, prompt: str | list[int], sampling: SamplingConfig) -> Iterator[tuple[int, float]]:
        """Yield (token id, seconds since the previous yield or since the call) for each new token."""
        ids = self.encode_prompt(prompt)
        if len(ids) + sampling.max_new_tokens > self.context_length:
            raise PromptError(
                f"prompt of {len(ids)} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the context of "
                f"{self.context_length} tokens — shorten the prompt or lower max_new_tokens"
            )
        rng = np.random.default_rng(sampling.seed)
        t0 = time.perf_counter()
        logits, past = self.forward(np.array([ids], dtype=np.int64), self._empty_cache(1), 0)
        position = len(ids)
        for n in range(sampling.max_new_tokens):
            token = pick(logits[0, -1].astype(np.float32), sampling, rng)
            t1 = time.perf_counter()
            yield token, t1 - t0
            t0 = t1
            if token in self.eos_ids and not sampling.ignore_eos:
                return
            if n + 1 == sampling.max_new_tokens:
                return
            logits, past = self.forward(np.array([[token]], dtype=np.int64), past, position)
            position += 1

    def generate(self, prompt: str | list[int], sampling: SamplingConfig = SamplingConfig()) -> Generation:
        out: list[int] = []
        times: list[float] = []
        for token, seconds in self.tokens(prompt, sampling):
            out.append(token)
            times.append(seconds)
        stopped = bool(out) and out[-1] in self.eos_ids and not sampling.ignore_eos
        return Generation(
            text=self.tokenizer.decode(out),
            token_ids=out,
            prompt_tokens=len(self.encode_prompt(prompt)),
            finish_reason="stop" if stopped else "length",
            ttft_s=times[0],
            token_times_s=times[1:],
        )

    def stream(self, prompt: str | list[int], sampling: SamplingConfig = SamplingConfig()) -> Iterator[str]:
        """Text deltas as tokens arrive; an end-of-sequence token ends the stream without text."""
        decoder = StreamDecoder(self.tokenizer)
        for token, _ in self.tokens(prompt, sampling):
            if token in self.eos_ids and not sampling.ignore_eos:
                return
            delta = decoder.push(token)
            if delta:
                yield delta


def pick(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> int:
    """Next token from one row of logits (vocab,)."""
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
