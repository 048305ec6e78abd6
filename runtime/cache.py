"""Prefill and decode on a builder graph (export.json "graph": "builder"): GroupQueryAttention over one KV buffer
per layer and kind, allocated once per generation at its final length and bound as both past and present.

GroupQueryAttention reads the first seqlens_k + 1 positions of each row's buffer and writes the new ones in place
after them (its past_present_share_buffer mode, entered when past and present are the same memory), so a decode
step copies nothing of the cache, where the torch graph's Concat writes the whole cache anew each step. The graph
derives seqlens_k (each row's tokens so far, minus one) and total_sequence_length (the mask's width) from
attention_mask, and the rotary positions from seqlens_k: there is no position_ids input.

A batch is right-padded: each row's prompt starts at position 0 of its buffer and its tokens follow its own prompt,
where GroupQueryAttention puts them; the padding's keys sit past the row's length, where they are never read, and
are overwritten by the row's next tokens.

A builder graph may carry an overridable initializer `logits_start` in front of its head
(export/graphs/builder.py): bound to -1 the head runs on each run's last position alone, to 0 on all of them. A
prefill binds -1 when the last position is every row's last token (one row, or rows of one length), 0 otherwise
and when all positions are asked for; a decode step has one position either way. A graph without it runs the head
on every position.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edge_lora.formats import LOGITS_START


class SharedCache:
    """One generation's KV cache on a builder graph, and the session runs that fill it."""

    def __init__(
        self,
        session: ort.InferenceSession,
        num_layers: int,
        kv_shape: tuple[int, int],
        prompts: list[list[int]],
        max_new_tokens: int,
        adapter_inputs: dict[str, ort.OrtValue] | None = None,
    ):
        """`adapter_inputs`: an active adapter's tensors ({LoRA input name: OrtValue}, lora.Adapter.tensors), bound
        for the whole generation; LoRA inputs left unbound keep their rank-0 defaults, the base model."""
        self.session = session
        self.lengths = np.array([len(p) for p in prompts])  # (batch,) tokens of each row in its buffer
        batch, width = len(prompts), int(self.lengths.max())
        # (batch, width), right-padded with token 0 (generate.PAD_ID): no real token attends to the padding
        self.ids = np.zeros((batch, width), dtype=np.int64)
        for i, prompt in enumerate(prompts):
            self.ids[i, : len(prompt)] = prompt
        # One column per position written so far, 1 where a row has a token (the graph: ReduceSum → seqlens_k).
        self.mask = np.zeros((batch, width + max_new_tokens), dtype=np.int64)
        for i, length in enumerate(self.lengths):
            self.mask[i, :length] = 1
        self.width = width
        inputs = {i.name: i for i in session.get_inputs()}
        dtype = np.float16 if inputs["past_key_values.0.key"].type == "tensor(float16)" else np.float32
        self.binding = session.io_binding()
        for name, value in (adapter_inputs or {}).items():
            self.binding.bind_ortvalue_input(name, value)
        self.buffers = []  # numpy arrays the OrtValues wrap in place; kept alive as long as the binding
        for layer in range(num_layers):
            for kind in ("key", "value"):
                # (batch, kv_heads, max_length, head_dim): zeros, so that a position never written reads as 0, not NaN
                buffer = np.zeros((batch, kv_shape[0], width + max_new_tokens, kv_shape[1]), dtype=dtype)
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                self.binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
                self.binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)
                self.buffers.append(buffer)
        self.vocab = next(o.shape[-1] for o in session.get_outputs() if o.name == "logits")
        # bound as OrtValues: IOBinding's bind_cpu_input looks names up among get_inputs(), which omits initializers
        self.starts = {start: ort.OrtValue.ortvalue_from_numpy(np.array([start], dtype=np.int64)) for start in (-1, 0)}
        self.prunable = LOGITS_START in {i.name for i in session.get_overridable_initializers()}
        self.logits = np.empty((batch, 1, self.vocab), dtype=np.float32)  # (batch, 1, vocab): each decode step's

    def prefill(self, all_positions: bool = False) -> np.ndarray:
        """Run every row's prompt: logits (batch, vocab) at each row's last prompt token, or with `all_positions`
        (batch, width, vocab) at every position (those past a row's length are padding's)."""
        last_only = self.prunable and not all_positions and bool((self.lengths == self.width).all())
        logits = np.empty((len(self.lengths), 1 if last_only else self.width, self.vocab), dtype=np.float32)
        self._run(self.ids, self.mask[:, : self.width], logits, -1 if last_only else 0)
        if all_positions:
            return logits
        return logits[:, 0] if last_only else logits[np.arange(len(self.lengths)), self.lengths - 1]

    def step(self, tokens: list[int], n: int) -> np.ndarray:
        """Run the n-th new token of each row (n from 0); logits (batch, vocab) after it, a view of the buffer the
        next step writes: a copy would add to every token's time (BENCHMARKS.md, Runtime)."""
        self.mask[np.arange(len(self.lengths)), self.lengths + n] = 1
        self._run(np.array(tokens, dtype=np.int64)[:, None], self.mask[:, : self.width + n + 1], self.logits, -1)
        return self.logits[:, 0]

    def _run(self, ids: np.ndarray, mask: np.ndarray, logits: np.ndarray, start: int) -> None:
        # Contiguous arrays are bound where they lie; the sliced mask is copied (batch × positions int64, small).
        if self.prunable:
            self.binding.bind_ortvalue_input(LOGITS_START, self.starts[start])
        self.binding.bind_cpu_input("input_ids", ids)
        self.binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(self.binding)
