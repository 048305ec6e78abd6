"""QLoRA training: frozen 4-bit base + LoRA adapters, packed batches, AdamW, checkpoints, one plain loop."""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_lora.errors import UsageError
from edge_lora.progress import progress_bar
from edge_lora.train import checkpoint, manifest
from edge_lora.train.config import TrainConfig
from edge_lora.train.data import Example, batch_order, load_examples, pack
from edge_lora.train.datacheck import check_data
from edge_lora.train.distributed import Distributed
from edge_lora.train.metrics import LOSS_PLOT, METRICS_FILE, MetricsLog, keep_rows_until, plot_loss
from edge_lora.train.qlora import (
    add_lora,
    compute_dtype,
    load_quantized_base,
    mixed_precision,
    resolve_model_dir,
    sum_lora_in_place,
)


@dataclass(frozen=True)
class Run:
    """What every step of a training run reads: its config, its processes, where it writes, and its base."""

    config: TrainConfig
    dist: Distributed
    output: Path
    fingerprint: dict
    """manifest.fingerprint of the base model."""


@dataclass
class TrainData:
    """The tokenized samples of a run, and what edge_lora.json records about them."""

    tokenizer: Any
    examples: list[Example]
    eval_examples: list[Example]
    card: dict
    """The data card (datacheck.check_data)."""
    record: dict
    """edge_lora.json's "data": the train and eval files' reports and how the eval split was made."""


@dataclass
class TrainState:
    """The model and what updates it: all that a checkpoint holds."""

    model: Any
    trainable: list
    optimizer: Any
    scheduler: Any
    scaler: Any
    autocast: Any
    """The context the forward passes run in (qlora.mixed_precision)."""

    def capture(self) -> dict:
        import torch

        return {
            "trainable": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def restore(self, state: dict) -> None:
        import torch

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])


def train(config: TrainConfig, show_progress: bool = True, resume: bool = False) -> Path:
    """Train a LoRA adapter on a 4-bit base and write the adapter dir; returns its path.

    With `resume`, continue from the newest complete checkpoint in the output dir: on a CPU with a fixed seed
    the result is bit-identical to a run that was never interrupted.
    """
    dist = Distributed.from_env()
    model_dir = resolve_model_dir(config.model)
    run = Run(config, dist, Path(config.output), manifest.fingerprint(model_dir))
    resume_from = checkpoint.to_resume(run.output, resume, config, run.fingerprint)
    data = load_data(config, model_dir)  # before any model is loaded: a failed data check costs nothing
    state = build_state(config, model_dir)
    start_step = prepare_output(run, state, resume_from)
    loss, seconds = run_steps(run, data, state, start_step, show_progress)
    save_checkpoint(run, state, config.max_steps)
    digests = dist.gather_strings(adapter_digest(state.model))
    if dist.main:
        metrics = {
            "train_loss": loss,
            "train_seconds": round(seconds, 2),
            "seconds_per_step": round(seconds / max(1, config.max_steps - start_step), 4),
            "resumed_from_step": start_step,
        }
        if data.eval_examples:
            metrics["eval_loss"] = evaluation_loss(
                state.model, data.eval_examples, config, data.tokenizer.pad_token_id, state.autocast
            )
        write_adapter(run, data, state, metrics, digests)
    dist.barrier()
    dist.close()
    return run.output


def load_data(config: TrainConfig, model_dir: Path) -> TrainData:
    """The tokenizer, the training samples and the held-out ones (eval_data, or a seeded eval_fraction of the
    data), with the data card; raises UsageError for data that cannot train."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, report = load_examples(config.data, tokenizer, config.max_length, config.train_on_prompt)
    card = check_data(config, examples, report)
    eval_report = None
    if config.eval_data:
        eval_examples, eval_report = load_examples(
            config.eval_data, tokenizer, config.max_length, config.train_on_prompt
        )
        eval_split = {"file": eval_report.to_dict()}
    else:
        examples, eval_examples = split_eval(examples, config)
        eval_split = {"fraction": config.eval_fraction, "samples": len(eval_examples)} if eval_examples else None
    if len(examples) < config.batch_size:
        raise UsageError(
            f"{config.data}: {len(examples)} training samples, fewer than batch_size={config.batch_size} "
            "— lower batch_size or add data"
        )
    record = {
        "train": report.to_dict(),
        "eval": eval_report.to_dict() if eval_report else None,
        "eval_split": eval_split,
    }
    return TrainData(tokenizer, examples, eval_examples, card, record)


def split_eval(examples: list, config: TrainConfig) -> tuple[list, list]:
    """Hold out `eval_fraction` of the samples, chosen with the run's seed."""
    n_eval = int(len(examples) * config.eval_fraction)
    if n_eval == 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def build_state(config: TrainConfig, model_dir: Path) -> TrainState:
    """The 4-bit base with fresh LoRA adapters (seeded), its optimizer, learning-rate schedule and loss scaler."""
    import torch

    torch.manual_seed(config.seed)
    model = add_lora(load_quantized_base(model_dir, config.quant), config.lora, config.gradient_checkpointing)
    dtype = compute_dtype(config.quant)
    autocast = mixed_precision(model, dtype)
    sum_lora_in_place(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    # fp16 activations underflow in the backward pass without a loss scale; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(model.device.type, enabled=dtype == torch.float16)
    return TrainState(model, trainable, optimizer, scheduler, scaler, autocast)


def make_optimizer(config: TrainConfig, params: list):
    import torch

    choice = config.optimizer
    if choice == "auto":
        choice = "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch"
    if choice == "paged_adamw_8bit":
        if not torch.cuda.is_available():
            raise UsageError("optimizer=paged_adamw_8bit needs a CUDA GPU — use adamw_torch (or auto) on a CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    done = (step - config.warmup_steps) / span
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    if config.schedule == "linear":
        return 1.0 - done
    return 1.0


def prepare_output(run: Run, state: TrainState, resume_from: Path | None) -> int:
    """Make the output dir, drop a checkpoint left half-written, and restore `resume_from` (metrics.jsonl kept up
    to its step); returns the step training starts at."""
    run.output.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_partial(run.output)
    metrics_path = run.output / METRICS_FILE
    if resume_from is None:
        if run.dist.main:
            metrics_path.write_text("")
        return 0
    saved, meta = checkpoint.load(resume_from)
    state.restore(saved)
    keep_rows_until(metrics_path, meta["step"])
    return meta["step"]


def run_steps(
    run: Run, data: TrainData, state: TrainState, start_step: int, show_progress: bool
) -> tuple[float, float]:
    """The optimizer steps from `start_step` to max_steps, logging and checkpointing as configured; returns the
    last step's loss and the seconds they took."""
    config, dist = run.config, run.dist
    loop_model = dist.wrap(state.model)
    state.model.train()
    started = time.perf_counter()
    log = MetricsLog(run.output / METRICS_FILE)
    loss = float("nan")
    with progress_bar("training", total=config.max_steps, enabled=show_progress and dist.main) as advance:
        advance(start_step, "resumed" if start_step else "")
        for step in range(start_step, config.max_steps):
            step_start = time.perf_counter()
            loss, grad_norm, step_tokens = optimizer_step(run, data, state, loop_model, step)
            log.count(step_tokens)
            done = step + 1
            if dist.main and (done % config.log_every == 0 or done == config.max_steps):
                log.write(done, loss, state.scheduler.get_last_lr()[0], grad_norm)
            if config.save_every and done % config.save_every == 0 and done < config.max_steps:
                save_checkpoint(run, state, done)
            advance(1, f"loss {loss:.4f}  {step_tokens / (time.perf_counter() - step_start):,.0f} tok/s")
    return loss, time.perf_counter() - started


def optimizer_step(run: Run, data: TrainData, state: TrainState, loop_model, step: int) -> tuple[float, float, int]:
    """Optimizer step `step`: returns its loss (the token mean over every process), the gradient norm before
    clipping (NaN without clipping) and the batch's loss tokens."""
    import torch

    config = run.config
    loss_sum, step_tokens = accumulate_gradients(run, data, state, loop_model, step)
    state.scaler.unscale_(state.optimizer)
    grad_norm = (
        torch.nn.utils.clip_grad_norm_(state.trainable, config.max_grad_norm).item()
        if config.max_grad_norm > 0
        else float("nan")
    )
    state.scaler.step(state.optimizer)  # skipped, and the scale lowered, when fp16 gradients overflowed
    state.scaler.update()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return run.dist.sum(loss_sum), grad_norm, step_tokens


def accumulate_gradients(run: Run, data: TrainData, state: TrainState, loop_model, step: int) -> tuple[float, int]:
    """Forward and backward over this process's share of step `step`'s batch, micro-batch by micro-batch;
    returns the share's summed loss and the whole batch's loss tokens."""
    config, dist = run.config, run.dist
    indices = batch_order(len(data.examples), config.batch_size, step, config.seed)
    # Every process knows the whole batch, so the loss normaliser needs no communication.
    step_tokens = sum(data.examples[i].loss_tokens for i in indices)
    mine = indices[dist.rank :: dist.world_size]
    micro_size = config.batch_size // config.grad_accum_steps
    loss_sum = 0.0
    for m in range(config.grad_accum_steps):
        micro = mine[m * micro_size // dist.world_size : (m + 1) * micro_size // dist.world_size]
        rows = pack([data.examples[i] for i in micro], config.pack_length, data.tokenizer.pad_token_id)
        batch = {k: v.to(state.model.device) for k, v in rows.items()}
        with dist.no_sync(loop_model, last_micro_batch=m == config.grad_accum_steps - 1):
            # Summed token losses over the whole step's tokens: micro-batches and processes add up to the step's
            # token mean. No cache: with one, transformers would not build the block-diagonal mask of a packed
            # batch. DDP averages gradients, hence * world_size.
            with state.autocast:
                loss = loop_model(**batch, use_cache=False, num_items_in_batch=step_tokens).loss
            state.scaler.scale(loss * dist.world_size).backward()
        loss_sum += loss.item()
    return loss_sum, step_tokens


def save_checkpoint(run: Run, state: TrainState, step: int) -> None:
    if run.dist.main:
        checkpoint.save(
            run.output,
            step,
            state.capture(),
            {"config": run.config.to_dict(), "base_fingerprint": run.fingerprint["digest"]},
            run.config.keep_checkpoints,
        )
    run.dist.barrier()


def write_adapter(run: Run, data: TrainData, state: TrainState, metrics: dict, digests: list[str]) -> None:
    """The adapter dir: PEFT's adapter files, the tokenizer, loss.png and edge_lora.json."""
    config, output = run.config, run.output
    state.model.save_pretrained(output)
    data.tokenizer.save_pretrained(output)
    plot_loss(output / METRICS_FILE, output / LOSS_PLOT)
    manifest.write(
        output,
        {
            "kind": "adapter",
            "base_model": config.model,
            "base_fingerprint": run.fingerprint,
            "quantization": quant_record(state.model, config),
            "lora": config.lora.__dict__ | {"target_modules": list(config.lora.target_modules)},
            "training": config.to_dict(),
            "data_card": data.card,
            "data": data.record,
            "metrics": metrics,
            "distributed": {
                "world_size": run.dist.world_size,
                "adapter_sha256_per_rank": digests,
                "ranks_identical": len(set(digests)) == 1,
            },
            "versions": manifest.library_versions(),
        },
    )


def trainable_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def adapter_digest(model) -> str:
    """sha256 over the trainable tensors' bytes, in name order: equal digests mean bit-identical adapters."""
    digest = hashlib.sha256()
    for name, value in sorted(trainable_state(model).items()):
        digest.update(name.encode())
        digest.update(value.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def evaluation_loss(model, examples: list[Example], config: TrainConfig, pad_id: int, autocast) -> float:
    """Token-mean loss over held-out examples, computed in packed batches without gradients."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast:
        for start in range(0, len(examples), config.batch_size):
            chunk = examples[start : start + config.batch_size]
            batch = {k: v.to(model.device) for k, v in pack(chunk, config.pack_length, pad_id).items()}
            # num_items_in_batch=1 turns the token mean into the token sum
            total += model(**batch, use_cache=False, num_items_in_batch=1).loss.item()
            count += sum(e.loss_tokens for e in chunk)
    model.train()
    return round(total / max(1, count), 6)


def quant_record(model, config: TrainConfig) -> dict:
    """The 4-bit storage as bitsandbytes applied it (block size is read from a quantized weight)."""
    import bitsandbytes as bnb

    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    state = layer.weight.quant_state
    return {
        "type": state.quant_type,
        "double_quant": state.nested,
        "block_size": state.blocksize,
        "compute_dtype": str(layer.compute_dtype).removeprefix("torch."),
        "requested": config.quant.__dict__,
    }
