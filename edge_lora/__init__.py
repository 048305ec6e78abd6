"""edge-lora: QLoRA fine-tune a Hugging Face causal LM, export it to ONNX with proven parity, run it torch-free.

Importing this package is light (no torch): each stage imports its dependencies when it is called.
"""

from pathlib import Path

from edge_lora.train.config import LoraConfig, QuantConfig, TrainConfig

__all__ = ["train", "TrainConfig", "QuantConfig", "LoraConfig"]


def train(config: TrainConfig, show_progress: bool = True, resume: bool = False) -> Path:
    """QLoRA training (see edge_lora.train.loop.train): returns the adapter dir."""
    from edge_lora.train.loop import train as run_training

    return run_training(config, show_progress=show_progress, resume=resume)
