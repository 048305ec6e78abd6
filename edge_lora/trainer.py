"""QLoRA training: frozen 4-bit base + LoRA adapters, packed batches, AdamW, one plain loop."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from edge_lora import manifest
from edge_lora.config import TrainConfig
from edge_lora.data import batch_order, load_examples, pack
from edge_lora.modeling import add_lora, load_quantized_base, resolve_model_dir
from edge_lora.progress import progress_bar


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


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def train(config: TrainConfig, show_progress: bool = True) -> Path:
    """Train a LoRA adapter on a 4-bit base and write the adapter dir; returns its path."""
    import torch
    from transformers import AutoTokenizer

    output = Path(config.output)
    model_dir = resolve_model_dir(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, data_report = load_examples(config.data, tokenizer, config.max_length, config.train_on_prompt)
    eval_report = None
    if config.eval_data:
        eval_examples, eval_report = load_examples(config.eval_data, tokenizer, config.max_length, config.train_on_prompt)

    torch.manual_seed(config.seed)
    model = add_lora(load_quantized_base(model_dir, config.quant), config.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))

    output.mkdir(parents=True, exist_ok=True)
    metrics_path = output / "metrics.jsonl"
    metrics_path.write_text("")
    model.train()
    started = time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    loss_value = float("nan")
    with progress_bar("training", total=config.max_steps, enabled=show_progress) as advance:
        for step in range(config.max_steps):
            batch = pack([examples[i] for i in batch_order(len(examples), config.batch_size, step, config.seed)],
                         config.pack_length, tokenizer.pad_token_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            # No cache: with one, transformers would not build the block-diagonal mask of a packed batch.
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm).item()
                if config.max_grad_norm > 0 else float("nan")
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()
            window_tokens += int((batch["labels"] != -100).sum()) + 0  # useful (loss-bearing) tokens
            if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
                now = time.perf_counter()
                row = {
                    "step": step + 1,
                    "loss": round(loss_value, 6),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": round(grad_norm, 6),
                    "loss_tokens_per_s": round(window_tokens / (now - window_start), 1),
                    "rss_mb": round(rss_mb(), 1),
                }
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                window_tokens, window_start = 0, now
            advance(1, f"loss {loss_value:.4f}")
    train_seconds = time.perf_counter() - started

    final = {"train_loss": loss_value, "train_seconds": round(train_seconds, 2),
             "seconds_per_step": round(train_seconds / config.max_steps, 4)}
    if eval_report is not None:
        final["eval_loss"] = evaluation_loss(model, eval_examples, config, tokenizer.pad_token_id)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    manifest.write(output, {
        "kind": "adapter",
        "base_model": config.model,
        "base_fingerprint": manifest.fingerprint(model_dir),
        "quantization": quant_record(model, config),
        "lora": config.lora.__dict__ | {"target_modules": list(config.lora.target_modules)},
        "training": config.to_dict(),
        "data": {"train": data_report.to_dict(), "eval": eval_report.to_dict() if eval_report else None},
        "metrics": final,
        "versions": manifest.library_versions(),
    })
    return output


def evaluation_loss(model, examples, config: TrainConfig, pad_id: int) -> float:
    """Token-mean loss over held-out examples, computed in packed batches without gradients."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), config.batch_size):
            batch = pack(examples[start : start + config.batch_size], config.pack_length, pad_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**{k: v.to(model.device) for k, v in batch.items()}, use_cache=False).loss.item() * n
            count += n
    model.train()
    return round(total / max(count, 1), 6)


def quant_record(model, config: TrainConfig) -> dict:
    """The 4-bit storage as bitsandbytes actually applied it (block size is read from a quantized weight)."""
    import bitsandbytes as bnb

    state = next(m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    return {
        "type": state.quant_type,
        "double_quant": state.nested,
        "block_size": state.blocksize,
        "compute_dtype": str(next(m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))).replace("torch.", ""),
        "requested": config.quant.__dict__,
    }
