"""`edge-lora train`: QLoRA on a 4-bit base, from options or a TOML file."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from edge_lora.errors import UsageError

if TYPE_CHECKING:
    from edge_lora.train.config import TrainConfig


@click.command("train")
@click.option("--model", default=None, help="Base model: a local Hugging Face dir or a hub id.")
@click.option("--data", default=None, help="Training JSONL: prompt/completion, messages or text records.")
@click.option("--eval-data", default=None, help="Held-out JSONL of the same shape.")
@click.option(
    "--eval-fraction", type=float, default=None, help="Without --eval-data: hold out this fraction of --data."
)
@click.option(
    "--config",
    "config_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="TOML file of TrainConfig fields (see examples/); the options here override it.",
)
@click.option("--output", default=None, help="Adapter dir to write [default: adapter].")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps [default: 600].")
@click.option("--batch-size", type=int, default=None, help="Samples per optimizer step [default: 32].")
@click.option("--grad-accum", "grad_accum_steps", type=int, default=None, help="Micro-batches per step [default: 1].")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Recompute activations: less memory.")
@click.option("--lr", "learning_rate", type=float, default=None, help="Peak learning rate [default: 2e-4].")
@click.option("--rank", type=int, default=None, help="LoRA rank r [default: 16].")
@click.option(
    "--compute-dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default=None,
    help="Dtype of the matmuls [default: auto: bfloat16 on a GPU or CPU that has it, else float32].",
)
@click.option("--max-length", type=int, default=None, help="Truncate samples to this many tokens [default: 512].")
@click.option("--seed", type=int, default=None, help="Seed [default: 0].")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps [default: only at the end].")
@click.option("--train-on-prompt", is_flag=True, default=None, help="Take the loss on prompt tokens too.")
@click.option(
    "--allow-overlap",
    is_flag=True,
    default=None,
    help="Train even when eval samples duplicate training samples (the data card records it).",
)
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(
    config_file: str | None, rank: int | None, compute_dtype: str | None, resume: bool, quiet: bool, **options
) -> None:
    """QLoRA: train LoRA adapters on a frozen 4-bit NF4 base; write a PEFT adapter dir with edge_lora.json,
    metrics.jsonl, loss.png and checkpoints/.

    \b
    Example:  edge-lora train --model demo-out/base --data demo-out/data/train.jsonl --output my-adapter \\
                  --max-steps 300 --lr 2e-3
              edge-lora train --config examples/date-reformat.toml
    """
    config = train_config(config_file, {k: v for k, v in options.items() if v is not None}, rank, compute_dtype)

    from edge_lora.train import manifest
    from edge_lora.train.loop import train as run_training

    out = run_training(config, show_progress=not quiet, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from the main process is enough
        metrics = manifest.read(out).metrics
        click.echo(
            f"adapter written to {out}: final loss {metrics['train_loss']:.4f}, "
            f"{metrics['seconds_per_step']:.3f} s/step"
        )


def train_config(config_file: str | None, given: dict, rank: int | None, compute_dtype: str | None) -> TrainConfig:
    """The TrainConfig of the --config file (if any) with the options `given` on top."""
    from edge_lora.train.config import TrainConfig, load_toml

    if config_file:
        config = load_toml(config_file, given)
    else:
        missing = [f"--{k}" for k in ("model", "data") if k not in given]
        if missing:
            raise UsageError(f"missing {' and '.join(missing)} — pass them, or a --config file that sets them")
        config = TrainConfig(**given)
    if rank is not None:
        config = config.with_overrides(lora={"r": rank})
    if compute_dtype is not None:
        config = config.with_overrides(quant={"compute_dtype": compute_dtype})
    return config
