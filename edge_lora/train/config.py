"""Training configuration: frozen dataclasses holding every default, checked once on construction.

A config comes from code, from a TOML file of the same shape (`[quant]` and `[lora]` tables for the nested
parts), or from the CLI, whose options override the file's values.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from edge_lora.errors import UsageError


def _check_choice(problems: list[str], name: str, value, literal) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        problems.append(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


QuantType = Literal["nf4", "fp4"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
BlockSize = Literal[32, 64, 128, 256, 512, 1024, 2048, 4096]  # the block sizes bitsandbytes' kernels take
Schedule = Literal["cosine", "linear", "constant"]
Optimizer = Literal["auto", "adamw_torch", "paged_adamw_8bit"]


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen base weights are stored (bitsandbytes 4-bit)."""

    quant_type: QuantType = "nf4"
    """4-bit data type: NF4 (QLoRA's normal float) or FP4."""
    double_quant: bool = True
    """Quantize the per-block absmax constants too (about 0.4 bits per weight saved)."""
    compute_dtype: ComputeDtype = "auto"
    """Dtype of the matmuls: "auto" picks bfloat16 on a GPU or CPU that has it (AVX512-BF16, AMX), else float32."""
    block_size: BlockSize = 64
    """Weights per quantization block (one absmax each): smaller is more accurate and larger; QLoRA uses 64."""

    def __post_init__(self):
        problems: list[str] = []
        _check_choice(problems, "quant.quant_type", self.quant_type, QuantType)
        _check_choice(problems, "quant.compute_dtype", self.compute_dtype, ComputeDtype)
        _check_choice(problems, "quant.block_size", self.block_size, BlockSize)
        if problems:
            raise UsageError("bad quantization config: " + "; ".join(problems))


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapters (PEFT) trained on top of the frozen base."""

    r: int = 16
    """Rank of each adapter pair A (r × in) and B (out × r)."""
    alpha: float = 32.0
    """Scale numerator: the delta is B @ A * alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input during training."""
    target_modules: tuple[str, ...] = ("all-linear",)
    """Module names to adapt; "all-linear" is every linear layer except the output head."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (a learned magnitude per output row)."""

    def __post_init__(self):
        problems: list[str] = []
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"lora.r={self.r!r} must be a positive integer, for example 16")
        if self.alpha <= 0:
            problems.append(f"lora.alpha={self.alpha!r} must be positive, for example 2 * r")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            problems.append('lora.target_modules is empty: name modules or use ["all-linear"]')
        if problems:
            raise UsageError("bad LoRA config: " + "; ".join(problems))


@dataclass(frozen=True)
class TrainConfig:
    """One QLoRA training run."""

    model: str
    """Base model: a local Hugging Face directory or a hub id."""
    data: str
    """Training data, JSONL: {"prompt","completion"}, {"messages"} or {"text"} per line."""
    output: str = "adapter"
    """Adapter directory to write."""
    eval_data: str | None = None
    """Held-out JSONL of the same shape; its loss is reported and its path goes into the manifest."""
    eval_fraction: float = 0.0
    """Without eval_data: hold out this fraction of the training samples (seeded) as the eval split."""
    max_steps: int = 600
    """Optimizer steps."""
    batch_size: int = 32
    """Samples per optimizer step (over all processes when distributed)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step: each holds batch_size / grad_accum_steps samples; less memory, same result."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory, about 30% more compute."""
    max_length: int = 512
    """Samples longer than this many tokens are truncated (and counted in the data report)."""
    pack_length: int = 512
    """Samples of one batch are packed into rows of at most this many tokens (no padding between them)."""
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    schedule: Schedule = "cosine"
    """Learning-rate decay after warm-up."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    optimizer: Optimizer = "auto"
    """"auto": bitsandbytes' paged 8-bit AdamW on CUDA, torch AdamW on a CPU (where the 8-bit one has no kernel)."""
    save_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end); --resume continues from the newest."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk, newest first (0 keeps all)."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (otherwise only completion tokens count)."""
    seed: int = 0
    """Seed for data order, adapter init and dropout."""
    log_every: int = 10
    """Write a metrics.jsonl row every this many steps."""
    max_overlap: float = 0.0
    """Fraction of eval samples that may (nearly) duplicate a training sample before training stops (datacheck.py)."""
    allow_overlap: bool = False
    """Train even when more than max_overlap of the eval samples duplicate training samples (the data card records
    it)."""
    near_duplicate_jaccard: float = 0.8
    """Jaccard similarity of character 5-gram shingles from which two samples count as near-duplicates."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        problems: list[str] = []
        for name in ("max_steps", "batch_size", "grad_accum_steps", "max_length", "pack_length", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        for name in ("save_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name}={value!r} must be an integer >= 0")
        accum = self.grad_accum_steps
        if isinstance(accum, int) and accum > 0 and self.batch_size % accum:
            problems.append(f"batch_size={self.batch_size} must be a multiple of grad_accum_steps={accum}")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction={self.eval_fraction!r} must be in [0, 1)")
        if self.eval_fraction and self.eval_data:
            problems.append("give eval_data or eval_fraction, not both")
        if self.pack_length < self.max_length:
            problems.append(f"pack_length={self.pack_length} must be >= max_length={self.max_length}")
        if not 0.0 <= self.max_overlap <= 1.0:
            problems.append(f"max_overlap={self.max_overlap!r} must be a fraction in [0, 1]")
        if not 0.0 < self.near_duplicate_jaccard <= 1.0:
            problems.append(
                f"near_duplicate_jaccard={self.near_duplicate_jaccard!r} must be in (0, 1], for example 0.8"
            )
        if self.learning_rate <= 0:
            problems.append(f"learning_rate={self.learning_rate!r} must be positive, for example 2e-4")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps!r} must be >= 0")
        if self.max_grad_norm < 0:
            problems.append(f"max_grad_norm={self.max_grad_norm!r} must be >= 0 (0 disables clipping)")
        _check_choice(problems, "schedule", self.schedule, Schedule)
        _check_choice(problems, "optimizer", self.optimizer, Optimizer)
        if problems:
            raise UsageError("bad training config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, **values) -> TrainConfig:
        """A copy with some top-level fields or nested `quant`/`lora` fields (given as dicts) changed."""
        merged = self.to_dict()
        for key, value in values.items():
            merged[key] = merged[key] | value if key in ("quant", "lora") else value
        return TrainConfig.from_dict(merged)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        """Build from plain values (a TOML file's), naming unknown keys instead of ignoring them."""
        values = dict(values)
        nested = {"quant": QuantConfig, "lora": LoraConfig}
        for key, sub in nested.items():
            if key in values:
                values[key] = _build(sub, values[key], f"{source} [{key}]")
        return _build(cls, values, source)


def _build(cls, values, source: str):
    if not isinstance(values, dict):
        raise UsageError(f"{source}: expected a table, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {', '.join(unknown)} — known keys: {', '.join(sorted(known))}")
    if "target_modules" in values and isinstance(values["target_modules"], list):
        values = {**values, "target_modules": tuple(values["target_modules"])}
    try:
        return cls(**values)
    except TypeError as e:
        raise UsageError(f"{source}: {e}") from None


def load_toml(path: str | Path, overrides: dict) -> TrainConfig:
    """Read a TOML config and apply CLI overrides (keys of TrainConfig; None means "not given")."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist — pass an existing .toml file to --config") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values, source=str(path))
