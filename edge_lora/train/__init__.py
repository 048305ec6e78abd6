"""Training: QLoRA (a frozen NF4 base from bitsandbytes, LoRA adapters from PEFT) on packed samples.

    edge_lora.train.train(TrainConfig) -> adapter dir      (the loop: edge_lora.train.loop)

Importing this package is light: torch, transformers and PEFT load when train() runs.
"""

from __future__ import annotations

from pathlib import Path

from edge_lora.train.config import LoraConfig, QuantConfig, TrainConfig

__all__ = ["train", "TrainConfig", "QuantConfig", "LoraConfig"]


def train(config: TrainConfig, show_progress: bool = True, resume: bool = False) -> Path:
    """QLoRA training: returns the adapter dir (see edge_lora.train.loop.train)."""
    from edge_lora.train.loop import train as run_training

    return run_training(config, show_progress=show_progress, resume=resume)
