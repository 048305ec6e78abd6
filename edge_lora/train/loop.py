"""QLoRA training: frozen 4-bit base + LoRA adapters, packed batches, AdamW, checkpoints, one plain loop."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

from edge_lora.train import checkpoint, manifest
from edge_lora.train.config import TrainConfig
from edge_lora.train.data import batch_order, load_examples, pack
from edge_lora.train.datacheck import check_data
from edge_lora.train.distributed import Distributed
from edge_lora.errors import UsageError
from edge_lora.train.qlora import (add_lora, compute_dtype, load_quantized_base, mixed_precision, resolve_model_dir,
                                sum_lora_in_place)
from edge_lora.progress import progress_bar

# Fields a resumed run may change: they steer logging and checkpointing, not what is computed.
RESUME_FREE_FIELDS = {"output", "save_every", "keep_checkpoints", "log_every", "allow_overlap"}


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


def make_optimizer(config: TrainConfig, params):
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


def split_eval(examples: list, config: TrainConfig) -> tuple[list, list]:
    """Hold out `eval_fraction` of the samples, chosen with the run's seed."""
    n_eval = int(len(examples) * config.eval_fraction)
    if n_eval == 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def check_resumable(meta: dict, config: TrainConfig, fingerprint: dict, where: Path) -> None:
    if meta["base_fingerprint"] != fingerprint["digest"]:
        raise UsageError(
            f"--resume: {where} was trained on another base model (fingerprint {meta['base_fingerprint'][:12]}… vs "
            f"{fingerprint['digest'][:12]}…) — pass the same --model, or a new --output to start over"
        )
    before, now = with_defaults(meta["config"], config), config.to_dict()
    changed = sorted(k for k in now if k not in RESUME_FREE_FIELDS and json.dumps(now[k]) != json.dumps(before.get(k)))
    if changed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise UsageError(f"--resume: the config differs from the checkpoint's ({diffs}) — use the same settings, or a new --output")


def with_defaults(saved: dict, config: TrainConfig) -> dict:
    """A checkpoint's config with the defaults of fields added to TrainConfig since it was written (in force then)."""
    defaults = TrainConfig(model=config.model, data=config.data).to_dict()
    merged = defaults | saved
    for key in ("quant", "lora"):
        merged[key] = defaults[key] | saved.get(key, {})
    return merged


def train(config: TrainConfig, show_progress: bool = True, resume: bool = False) -> Path:
    """Train a LoRA adapter on a 4-bit base and write the adapter dir; returns its path.

    With `resume`, continue from the newest complete checkpoint in the output dir: on a CPU with a fixed seed
    the result is bit-identical to a run that was never interrupted.
    """
    import torch
    from transformers import AutoTokenizer

    dist = Distributed.from_env()
    output = Path(config.output)
    model_dir = resolve_model_dir(config.model)
    fingerprint = manifest.fingerprint(model_dir)
    resume_from = checkpoint.newest(output) if resume else None
    if resume and resume_from is None:
        raise UsageError(f"--resume: no complete checkpoint in {output / checkpoint.CHECKPOINTS} — run without --resume to start")
    if resume_from is not None:
        check_resumable(checkpoint.load(resume_from)[1], config, fingerprint, output)
    elif checkpoint.complete(output) or (output / manifest.MANIFEST).exists():
        raise UsageError(f"output {output} already holds a training run — pass --resume to continue it, or choose another --output")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, data_report = load_examples(config.data, tokenizer, config.max_length, config.train_on_prompt)
    data_card = check_data(config, examples, data_report)  # before any model is loaded: a failed check costs nothing
    eval_report = None
    if config.eval_data:
        eval_examples, eval_report = load_examples(config.eval_data, tokenizer, config.max_length, config.train_on_prompt)
        eval_source = {"file": eval_report.to_dict()}
    else:
        examples, eval_examples = split_eval(examples, config)
        eval_source = {"fraction": config.eval_fraction, "samples": len(eval_examples)} if eval_examples else None
    if len(examples) < config.batch_size:
        raise UsageError(f"{config.data}: {len(examples)} training samples, fewer than batch_size={config.batch_size} — lower batch_size or add data")

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

    output.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_partial(output)
    metrics_path = output / "metrics.jsonl"
    start_step = 0
    if resume_from is not None:
        state, meta = checkpoint.load(resume_from)
        start_step = meta["step"]
        restore(model, optimizer, scheduler, scaler, state)
        rows = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        metrics_path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= start_step))
    elif dist.main:
        metrics_path.write_text("")
    loop_model = dist.wrap(model)
    model.train()

    def save_checkpoint(step: int) -> None:
        if dist.main:
            checkpoint.save(output, step, capture(model, optimizer, scheduler, scaler),
                            {"config": config.to_dict(), "base_fingerprint": fingerprint["digest"]}, config.keep_checkpoints)
        dist.barrier()

    micro_size = config.batch_size // config.grad_accum_steps
    started = time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    loss_value = float("nan")
    with progress_bar("training", total=config.max_steps, enabled=show_progress and dist.main) as advance:
        advance(start_step, "resumed" if start_step else "")
        for step in range(start_step, config.max_steps):
            step_start = time.perf_counter()
            indices = batch_order(len(examples), config.batch_size, step, config.seed)
            # Every process knows the whole batch, so the loss normaliser needs no communication.
            step_tokens = sum(examples[i].loss_tokens for i in indices)
            mine = indices[dist.rank :: dist.world_size]
            loss_sum = 0.0
            for m in range(config.grad_accum_steps):
                micro = mine[m * micro_size // dist.world_size : (m + 1) * micro_size // dist.world_size]
                batch = {k: v.to(model.device) for k, v in pack([examples[i] for i in micro], config.pack_length,
                                                               tokenizer.pad_token_id).items()}
                with dist.no_sync(loop_model, last_micro_batch=m == config.grad_accum_steps - 1):
                    # Summed token losses over the whole step's tokens: micro-batches and processes add up to
                    # the step's token mean. No cache: with one, transformers would not build the
                    # block-diagonal mask of a packed batch. DDP averages gradients, hence * world_size.
                    with autocast:
                        loss = loop_model(**batch, use_cache=False, num_items_in_batch=step_tokens).loss
                    scaler.scale(loss * dist.world_size).backward()
                loss_sum += loss.item()
            scaler.unscale_(optimizer)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm).item()
                if config.max_grad_norm > 0 else float("nan")
            )
            scaler.step(optimizer)  # skipped, and the scale lowered, when fp16 gradients overflowed
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = dist.sum(loss_sum)
            window_tokens += step_tokens
            done = step + 1
            if dist.main and (done % config.log_every == 0 or done == config.max_steps):
                now = time.perf_counter()
                row = {"step": done, "loss": round(loss_value, 6), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": round(grad_norm, 6), "loss_tokens_per_s": round(window_tokens / (now - window_start), 1),
                       "rss_mb": round(rss_mb(), 1)}
                if torch.cuda.is_available():
                    row["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                window_tokens, window_start = 0, now
            if config.save_every and done % config.save_every == 0 and done < config.max_steps:
                save_checkpoint(done)
            advance(1, f"loss {loss_value:.4f}  {step_tokens / (time.perf_counter() - step_start):,.0f} tok/s")
    train_seconds = time.perf_counter() - started
    save_checkpoint(config.max_steps)

    digests = dist.gather_strings(adapter_digest(model))
    if dist.main:
        final = {"train_loss": loss_value, "train_seconds": round(train_seconds, 2),
                 "seconds_per_step": round(train_seconds / max(1, config.max_steps - start_step), 4),
                 "resumed_from_step": start_step}
        if eval_examples:
            final["eval_loss"] = evaluation_loss(model, eval_examples, config, tokenizer.pad_token_id, autocast)
        model.save_pretrained(output)
        tokenizer.save_pretrained(output)
        plot_loss(metrics_path, output / "loss.png")
        manifest.write(output, {
            "kind": "adapter",
            "base_model": config.model,
            "base_fingerprint": fingerprint,
            "quantization": quant_record(model, config),
            "lora": config.lora.__dict__ | {"target_modules": list(config.lora.target_modules)},
            "training": config.to_dict(),
            "data_card": data_card,
            "data": {"train": data_report.to_dict(), "eval": eval_report.to_dict() if eval_report else None,
                     "eval_split": eval_source},
            "metrics": final,
            "distributed": {"world_size": dist.world_size, "adapter_sha256_per_rank": digests,
                            "ranks_identical": len(set(digests)) == 1},
            "versions": manifest.library_versions(),
        })
    dist.barrier()
    dist.close()
    return output


def trainable_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def capture(model, optimizer, scheduler, scaler) -> dict:
    import torch

    return {"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state()}


def restore(model, optimizer, scheduler, scaler, state: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])


def adapter_digest(model) -> str:
    """sha256 over the trainable tensors' bytes, in name order: equal digests mean bit-identical adapters."""
    digest = hashlib.sha256()
    for name, value in sorted(trainable_state(model).items()):
        digest.update(name.encode())
        digest.update(value.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def evaluation_loss(model, examples, config: TrainConfig, pad_id: int, autocast) -> float:
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


def plot_loss(metrics_path: Path, png: Path) -> None:
    """loss.png: training loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="edge-lora training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
