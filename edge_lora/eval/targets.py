"""What can be evaluated: an export dir on the runtime (no torch), or an adapter dir in PyTorch — the 4-bit base
with the adapter on top, loaded as the export's reference is (edge_lora/train/reference.py).

Both tokenize with the `tokenizers` library from the dir's tokenizer.json and render chat prompts with
edge_lora.runtime.chat, so that the two kinds of target see the same token ids for the same sample.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.eval.samples import EvalError, EvalSample
from edge_lora.formats import ADAPTER_MANIFEST, EXPORT_MANIFEST, TOKENIZER_FILE, ExportManifest
from edge_lora.runtime.chat import ChatError, ChatTemplate
from edge_lora.runtime.tokenizer import TextTokenizer

# Keys of tokenizer.json that say how text becomes ids; padding and truncation are settings of a call.
TOKENIZER_KEYS = ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder")


@dataclass(frozen=True)
class TargetSpec:
    """A target before anything is loaded: where it is, which kind, and its tokenizer's digest."""

    path: Path
    kind: str
    """"export" (export.json) or "adapter" (edge_lora.json)."""
    adapter: str | None = None
    """The adapter to activate in an export of flavor adapters."""

    @property
    def label(self) -> str:
        return f"{self.path}" + (f" --adapter {self.adapter}" if self.adapter else "")

    def tokenizer_digest(self) -> str:
        return tokenizer_digest(self.path)

    def has_logits(self) -> bool:
        """Whether the target can give logits: an export's graph must output them (a PyTorch model always does)."""
        if self.kind == "adapter":
            return True
        return ExportManifest.load(self.path).has_logits


def spec(path: str | Path, adapter: str | None = None) -> TargetSpec:
    path = Path(path)
    if (path / EXPORT_MANIFEST).is_file():
        return TargetSpec(path, "export", adapter)
    if (path / ADAPTER_MANIFEST).is_file():
        if adapter is not None:
            raise EvalError(
                f"--adapter {adapter} applies to an export of flavor adapters, but {path} is an adapter dir — "
                "drop --adapter, or pass the export dir"
            )
        return TargetSpec(path, "adapter")
    raise EvalError(
        f"target {path} is neither an export dir (export.json) nor an adapter dir (edge_lora.json) — "
        "pass the --output dir of edge-lora export or edge-lora train"
    )


def tokenizer_digest(target_dir: Path) -> str:
    """sha256 of what makes tokenizer.json turn text into ids: equal digests, equal token ids."""
    path = Path(target_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise EvalError(
            f"{target_dir} has no tokenizer.json — evaluation tokenizes with it; save the tokenizer "
            "there (edge-lora train and export do)"
        )
    tokenizer = json.loads(path.read_text())
    return hashlib.sha256(
        json.dumps({k: tokenizer.get(k) for k in TOKENIZER_KEYS}, sort_keys=True).encode()
    ).hexdigest()


class Target:
    """Prompt ids, greedy completions and logits of one model; subclasses say how the model runs."""

    def __init__(self, spec_: TargetSpec, eos_ids: list[int], context_length: int):
        self.spec = spec_
        self.tokenizer = TextTokenizer(spec_.path / TOKENIZER_FILE)
        self.template = ChatTemplate.load(spec_.path)
        self.eos_ids = set(eos_ids)
        self.eos_id = eos_ids[0]
        """The end-of-sequence token training appended to every completion (the model config's first)."""
        self.context_length = context_length

    def prompt_ids(self, sample: EvalSample) -> list[int]:
        """The prompt as training tokenized it: the tokenizer's special tokens (a BOS) before a prompt, or the
        chat template's rendering of a messages record's turns, which already holds them."""
        if sample.shape != "messages":
            return self.tokenizer.encode(sample.prompt)
        if self.template is None:
            raise EvalError(
                f"{sample.where}: a messages record needs a chat template, and {self.spec.path} has none — "
                "use prompt/completion records"
            )
        try:
            text = self.template.render(list(sample.messages), add_generation_prompt=True)
        except ChatError as e:
            raise EvalError(f"{sample.where}: {e}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reference_ids(self, sample: EvalSample) -> list[int]:
        """The reference's tokens and an end-of-sequence token, as training appended one to every completion."""
        return self.tokenizer.encode(sample.reference, add_special_tokens=False) + [self.eos_id]

    def complete(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, float]:
        """Greedy completion text and its wall time in seconds."""
        raise NotImplementedError

    def complete_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy completion texts of several prompts, where no per-sample latency is wanted."""
        return [self.complete(ids, max_new_tokens)[0] for ids in prompts]

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits (len(ids), vocab) as float32."""
        raise NotImplementedError


class RuntimeTarget(Target):
    def __init__(self, spec_: TargetSpec, device: str | None = None, threads: int | None = None, generator=None):
        """`generator`: an already loaded runtime.Generator for the export at spec_.path (the parity gate's)."""
        from edge_lora import runtime

        if generator is None:
            generator = runtime.load(spec_.path, device=device, threads=threads).with_adapter(spec_.adapter)
        self.generator = generator
        super().__init__(spec_, self.generator.export.manifest.eos_token_ids, self.generator.context_length)

    def complete(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, float]:
        from edge_lora.runtime import SamplingConfig

        start = time.perf_counter()
        text = self.generator.generate(prompt_ids, SamplingConfig(max_new_tokens=max_new_tokens)).text
        return text, time.perf_counter() - start

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.generator.logits(ids)


class TorchTarget(Target):
    BATCH = 64  # prompts per generate call in complete_batch

    def __init__(self, spec_: TargetSpec, base: str | None = None, model=None):
        """`model`: an already loaded PyTorch model of the adapter at spec_.path (the export's reference), else the
        4-bit base with the adapter on top, loaded as the export's reference is."""
        if model is None:
            from edge_lora.train import manifest as adapter_manifest
            from edge_lora.train.reference import base_dir_of, qlora_model

            manifest = adapter_manifest.read(spec_.path)
            model = qlora_model(spec_.path, base_dir_of(spec_.path, manifest, base, force=False), manifest)
        self.model = model
        eos = self.model.config.eos_token_id
        super().__init__(
            spec_, list(eos) if isinstance(eos, (list, tuple)) else [eos], self.model.config.max_position_embeddings
        )
        pad = self.model.config.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_id

    def complete(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, float]:
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=self.pad_id,
            )
        return self.cut_at_eos(out[0, len(prompt_ids) :].tolist()), time.perf_counter() - start

    def complete_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy completions BATCH prompts at a time, left-padded so that every row's next token comes last."""
        import torch

        texts = []
        for start in range(0, len(prompts), self.BATCH):
            chunk = prompts[start : start + self.BATCH]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=sorted(self.eos_ids),
                    pad_token_id=self.pad_id,
                )
            texts += [self.cut_at_eos(row[width:].tolist()) for row in out]
        return texts

    def cut_at_eos(self, new: list[int]) -> str:
        """The text of the tokens up to and including the first end-of-sequence token."""
        cut = next((i + 1 for i, t in enumerate(new) if t in self.eos_ids), len(new))
        return self.tokenizer.decode(new[:cut])

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def load(spec_: TargetSpec, base: str | None = None, device: str | None = None, threads: int | None = None) -> Target:
    """Load the model: torch is imported only for an adapter dir."""
    if spec_.kind == "export":
        return RuntimeTarget(spec_, device=device, threads=threads)
    return TorchTarget(spec_, base=base)
