"""Token generation on an onnxruntime session of a decoder graph with KV cache inputs and outputs.

A Generator holds only what every request shares (the session, the tokenizer, the adapters); everything one
request changes (its KV cache, rows, sampler) lives in the call, so one Generator serves several threads at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edge_lora.formats import GENERATION_CONFIG
from edge_lora.runtime.cache import SharedCache
from edge_lora.runtime.chat import ChatError, ChatTemplate
from edge_lora.runtime.package import ExportDir
from edge_lora.runtime.sampling import PromptError, SamplingConfig, penalize_repetition, pick
from edge_lora.runtime.tokenizer import StopStrings, StreamDecoder, TextTokenizer

__all__ = ["Generation", "Generator", "PromptError", "SamplingConfig", "Step", "pick"]

# The token under the left padding of a batch's shorter prompts: any id in the vocabulary does, as the
# attention mask hides it from every real token.
PAD_ID = 0


@dataclass
class Generation:
    text: str
    """The decoded new tokens, ending before a stop string if one ended the generation."""
    token_ids: list[int]
    """Every new token, including the one that ended the generation (an end-of-sequence or stop token, the last
    token of a stop string)."""
    prompt_tokens: int
    """Tokens of the prompt as the model read it (after any truncation)."""
    finish_reason: str
    """"stop" (an end-of-sequence token, a stop token or a stop string) or "length" (max_new_tokens reached)."""
    ttft_s: float
    """Prompt in, first new token out: prefill plus one sampling step."""
    token_times_s: list[float] = field(default_factory=list)
    """Time of each later token after the one before it."""

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.token_times_s)
        return len(self.token_times_s) / total if total > 0 else float("nan")


@dataclass(frozen=True)
class Step:
    """One new token of a generation, as Generator.steps yields it."""

    token_id: int
    seconds: float
    """Since the previous token, or since the call for the first (time to first token)."""
    text: str
    """The text this token lets out: "" while a multi-byte character or a possible stop string is incomplete."""
    finish_reason: str | None
    """None until the last token: then "stop" or "length"."""


class Generator:
    """Runs prefill and decode on one session; the KV cache is handed from each step's outputs to the next."""

    def __init__(self, export: ExportDir, session, tokenizer: TextTokenizer, adapters: dict | None = None):
        self.export = export
        self.session = session
        self.tokenizer = tokenizer
        kv = export.manifest.kv_cache
        self.num_layers = kv.num_layers
        self.kv_shape = (kv.num_kv_heads, kv.head_dim)
        self.context_length = kv.context_length
        self.eos_ids = set(export.manifest.eos_token_ids) | generation_eos_ids(export)
        """End-of-sequence tokens: the model config's, and those its generation_config.json adds (a chat model's
        end-of-turn token is often only there, as in Llama 3 Instruct)."""
        self.chat_template = ChatTemplate.load(export.path)
        """The model's chat template, or None when its tokenizer has none."""
        self._inputs = {i.name for i in session.get_inputs()}
        self._outputs = [o.name for o in session.get_outputs()]
        self._dtype = cache_dtype(export)
        self.graph = export.manifest.graph
        """"torch" (and "optimum", which exports made before transformers 5 record: the same inputs and outputs): a
        cache handed from present.* to past.* (_GrowingCache); "builder": one shared KV buffer per layer and kind,
        bound once per generation (cache.SharedCache)."""
        self.adapters = adapters or {}
        """Loaded adapters by name (lora.Adapter)."""
        self.adapter: str | None = None
        self.kernel: str | None = None
        """The edge-lora kernel whose graph the session runs (runtime.load sets it), None for the portable graph."""
        self._run_options = None  # with the active adapter, for session.run (the torch graph)
        self._adapter_inputs: dict = {}  # the active adapter's tensors, for IOBinding (the builder graph)

    def with_adapter(self, name: str | None, adapter=None) -> Generator:
        """A generator on the same session and memory-mapped adapters with `name` active (None: the base model).

        Switching costs no reload: the adapter's tensors are fed as graph inputs on each run. `adapter`, a loaded
        lora.Adapter, is used under `name` instead of the export's own (a new version while serving).
        """
        import copy

        import onnxruntime as ort

        if name is not None and adapter is None and name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none (this export has no adapters)"
            raise PromptError(f"unknown adapter {name!r} — known adapters: {known}")
        view = copy.copy(self)
        view.adapter, view._run_options, view._adapter_inputs = name, None, {}
        if name is not None:
            active = adapter if adapter is not None else self.adapters[name]
            if self.graph == "builder":
                slots = self.export.manifest.kernels[self.kernel].lora_slots if self.kernel else None
                view._adapter_inputs = active.tensors_for(self.kernel, slots)
            else:
                view._run_options = ort.RunOptions()
                view._run_options.add_active_adapter(active.lora)
        return view

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_shape[0], 0, self.kv_shape[1])  # (batch, kv_heads, seq, head_dim)
        empty = np.zeros(shape, dtype=self._dtype)
        return {f"past_key_values.{i}.{kind}": empty for i in range(self.num_layers) for kind in ("key", "value")}

    def _cache(self, prompts: list[list[int]], max_new_tokens: int) -> _GrowingCache | SharedCache:
        """A new generation's KV cache for `prompts`, on this export's graph."""
        if self.graph == "builder":
            return SharedCache(
                self.session, self.num_layers, self.kv_shape, prompts, max_new_tokens, self._adapter_inputs
            )
        return _GrowingCache(self, prompts)

    def forward(
        self,
        ids: np.ndarray,
        past: dict[str, np.ndarray],
        start: int,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict]:
        """Logits (batch, seq, vocab) for `ids` (batch, seq) at positions start.., and the grown cache (a torch
        graph's; a builder graph runs through cache.SharedCache).

        Without a mask every row is real tokens; a left-padded batch passes attention_mask (batch, start + seq),
        0 on padding, and position_ids (batch, seq), each row's own positions.

        The cache goes in and out as numpy arrays, and neither way is copied: onnxruntime wraps a contiguous
        input array in place and returns outputs as views of its own buffers. That is why this is not an
        IOBinding of OrtValues: the torch graph concatenates past and new keys into present.* (so a step
        writes a new cache whichever way it is bound), and binding the previous step's present.* OrtValues as
        the next step's past adds binding calls that cost more than they save: a decode step is no faster that
        way at any cache length, and slower at some.
        """
        batch, seq = ids.shape
        feeds = {"input_ids": ids, **past}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = (
                np.ones((batch, start + seq), dtype=np.int64) if attention_mask is None else attention_mask
            )
        if "position_ids" in self._inputs:
            feeds["position_ids"] = (
                np.broadcast_to(np.arange(start, start + seq, dtype=np.int64), (batch, seq))
                if position_ids is None
                else position_ids
            )
        outputs = self.session.run(self._outputs, feeds, self._run_options)
        named = dict(zip(self._outputs, outputs))
        present = {
            f"past_key_values.{i}.{kind}": named[f"present.{i}.{kind}"]
            for i in range(self.num_layers)
            for kind in ("key", "value")
        }
        return named["logits"], present

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits (seq, vocab) of one sequence in a single prefill, as float32."""
        if self.graph == "builder":
            return self._cache([ids], 0).prefill(all_positions=True)[0]
        logits, _ = self.forward(np.array([ids], dtype=np.int64), self._empty_cache(1), 0)
        return logits[0].astype(np.float32)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise PromptError("the prompt is empty — give at least one token of text")
        return ids

    def render_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation ([{"role", "content"}, ...]) through the model's chat template, ending
        where the assistant's reply starts. The template writes its own special tokens: none are added."""
        text = self.require_chat_template().render(messages)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def require_chat_template(self) -> ChatTemplate:
        """The model's chat template, or a ChatError that says this export has none."""
        if self.chat_template is None:
            raise ChatError(
                f"{self.export.path} has no chat template (no chat_template.jinja, no chat_template in "
                "tokenizer_config.json) — pass a plain prompt, or export from a tokenizer that has one"
            )
        return self.chat_template

    def fit_prompt(self, ids: list[int], sampling: SamplingConfig) -> list[int]:
        """`ids`, or with truncate="left" their last context - max_new_tokens, so that the generation fits the
        context; a prompt that does not fit otherwise is refused with both lengths named."""
        room = self.context_length - sampling.max_new_tokens
        if len(ids) <= room:
            return ids
        if room < 1:
            raise PromptError(
                f"max_new_tokens {sampling.max_new_tokens} leaves no room for a prompt in the context "
                f"of {self.context_length} tokens — lower max_new_tokens below {self.context_length}"
            )
        if sampling.truncate == "left":
            return ids[-room:]
        raise PromptError(
            f"prompt of {len(ids)} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the context of "
            f"{self.context_length} tokens — shorten the prompt to {room} tokens, lower max_new_tokens, or drop "
            "the prompt's start with --truncate left (truncate='left')"
        )

    def steps(self, prompt: str | list[int], sampling: SamplingConfig) -> Iterator[Step]:
        """One Step per new token, up to the one that ends the generation (end-of-sequence, stop token, or the last
        token of a stop string): its id, its time, the text it lets out, and the finish reason on the last one."""
        row = self._row(prompt, sampling)
        for _ in self._run([row], sampling):  # one row: each round adds exactly one token to it
            yield Step(row.token_ids[-1], row.times[-1], row.deltas[-1], row.finish_reason)

    def tokens(self, prompt: str | list[int], sampling: SamplingConfig) -> Iterator[tuple[int, float]]:
        """Yield (token id, seconds since the previous yield or since the call) for each new token (see steps)."""
        for step in self.steps(prompt, sampling):
            yield step.token_id, step.seconds

    def generate(self, prompt: str | list[int], sampling: SamplingConfig = SamplingConfig()) -> Generation:
        """The new tokens and their text for one prompt (text, or token ids as they are)."""
        return self.generate_batch([prompt], sampling)[0]

    def generate_batch(
        self, prompts: list[str | list[int]], sampling: SamplingConfig = SamplingConfig()
    ) -> list[Generation]:
        """One Generation per prompt, all decoded together in one batch (left-padded); each row stops on its own,
        and the batch ends when every row has."""
        if not prompts:
            raise PromptError("no prompts were given — pass a list of one or more prompts")
        rows = [self._row(prompt, sampling) for prompt in prompts]
        for _ in self._run(rows, sampling):
            pass
        return [row.generation() for row in rows]

    def stream(self, prompt: str | list[int], sampling: SamplingConfig = SamplingConfig()) -> Iterator[str]:
        """Text deltas as tokens arrive. A delta never ends inside a multi-byte character or shows a part of a
        stop string; their concatenation is generate()'s text."""
        for step in self.steps(prompt, sampling):
            if step.text:
                yield step.text

    def chat(self, messages: list[dict], sampling: SamplingConfig = SamplingConfig()) -> Generation:
        """The assistant's reply to a conversation, through the model's chat template (see render_chat)."""
        return self.generate(self.render_chat(messages), sampling)

    def _row(self, prompt: str | list[int], sampling: SamplingConfig) -> _Row:
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else self.eos_ids)
        return _Row(
            self.fit_prompt(self.encode_prompt(prompt), sampling),
            stop_ids,
            StreamDecoder(self.tokenizer),
            StopStrings(sampling.stop),
        )

    def _run(self, rows: list[_Row], sampling: SamplingConfig) -> Iterator[list[str]]:
        """Prefill every row's prompt in one batch, then decode one token per row per step until every row has
        finished. Yields each step's text delta per row ("" for a row with none, or finished)."""
        batch = len(rows)
        # One stream per row, so that a row's samples do not depend on which other rows are still running.
        rngs = np.random.default_rng(sampling.seed).spawn(batch)
        start = time.perf_counter()
        cache = self._cache([row.prompt_ids for row in rows], sampling.max_new_tokens)
        logits = cache.prefill()  # (batch, vocab) at each row's last token
        penalized = sampling.repetition_penalty != 1
        seen = np.zeros(logits.shape, dtype=bool)  # (batch, vocab): tokens in each row's prompt and output so far
        for i, row in enumerate(rows if penalized else []):
            seen[i, row.prompt_ids] = True
        for n in range(sampling.max_new_tokens):
            picked = [
                pick(penalize_repetition(logits[i], seen[i], sampling.repetition_penalty), sampling, rngs[i])
                if row.finish_reason is None
                else PAD_ID
                for i, row in enumerate(rows)
            ]
            now = time.perf_counter()
            deltas = [
                row.add(token, now - start, sampling.max_new_tokens) if row.finish_reason is None else ""
                for row, token in zip(rows, picked)
            ]
            if penalized:
                seen[np.arange(batch), picked] = True
            yield deltas
            start = now  # time the caller spends between steps counts toward the next token, as it waits for it
            if all(row.finish_reason is not None for row in rows) or n + 1 == sampling.max_new_tokens:
                return
            # A finished row is fed PAD_ID and its logits ignored: dropping it would copy the whole cache.
            logits = cache.step(picked, n)


class _GrowingCache:
    """One generation's KV cache on a torch graph: prompts left-padded, the cache handed from each step's
    present.* to the next step's past.* (see Generator.forward)."""

    def __init__(self, generator: Generator, prompts: list[list[int]]):
        self.forward = generator.forward
        batch = len(prompts)
        self.lengths = np.array([len(p) for p in prompts])
        self.width = int(self.lengths.max())
        self.ids = np.full((batch, self.width), PAD_ID, dtype=np.int64)  # (batch, width), prompts left-padded
        self.mask = np.zeros((batch, self.width), dtype=np.int64)  # 1 on real tokens, 0 on padding
        for i, prompt in enumerate(prompts):
            self.ids[i, self.width - len(prompt) :] = prompt
            self.mask[i, self.width - len(prompt) :] = 1
        self.past = generator._empty_cache(batch)

    def prefill(self) -> np.ndarray:
        """Logits (batch, vocab) at each row's last prompt token."""
        # Each row counts its positions from its own first token; padding gets 0, any valid position: it is masked.
        positions = np.maximum(self.mask.cumsum(axis=1) - 1, 0)
        logits, self.past = self.forward(self.ids, self.past, 0, self.mask, positions)
        return logits[:, -1].astype(np.float32)

    def step(self, tokens: list[int], n: int) -> np.ndarray:
        """Run the n-th new token of each row (n from 0); logits (batch, vocab) after it."""
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        positions = (self.lengths + n)[:, None]  # (batch, 1): the position of the token just picked
        logits, self.past = self.forward(
            np.array(tokens, dtype=np.int64)[:, None], self.past, self.width + n, self.mask, positions
        )
        return logits[:, -1].astype(np.float32)


def cache_dtype(export: ExportDir) -> type[np.floating]:
    """The dtype of the KV cache the export's graph takes: its precision's float type (fp16, else fp32)."""
    return np.float16 if export.manifest.precision == "fp16" else np.float32


def generation_eos_ids(export: ExportDir) -> set[int]:
    """eos_token_id of the export's generation_config.json (an int or a list), the ids transformers' generate
    stops at; none when the file is absent."""
    path = export.path / GENERATION_CONFIG
    eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    return set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set()


@dataclass
class _Row:
    """One prompt's share of a generation call: its ids, what it has generated, and its text so far."""

    prompt_ids: list[int]
    stop_ids: set[int]
    """Tokens that end this row: the end-of-sequence ones unless ignored, and the request's stop tokens."""
    decoder: StreamDecoder
    stops: StopStrings
    token_ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, token: int, seconds: float, max_new_tokens: int) -> str:
        """Take the next token; return the text it lets out."""
        self.token_ids.append(token)
        self.times.append(seconds)
        if token in self.stop_ids:  # its text (none for a special token) is not part of the reply
            delta = self._finish("stop")
        else:
            delta = self.stops.push(self.decoder.push(token))
            if self.stops.stopped is not None:
                self.finish_reason = "stop"
            elif len(self.token_ids) == max_new_tokens:
                delta += self._finish("length")
        self.deltas.append(delta)
        return delta

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        return self.stops.push(self.decoder.flush()) + self.stops.flush()

    def generation(self) -> Generation:
        return Generation(
            text="".join(self.deltas),
            token_ids=self.token_ids,
            prompt_tokens=len(self.prompt_ids),
            finish_reason=self.finish_reason,
            ttft_s=self.times[0],
            token_times_s=self.times[1:],
        )
