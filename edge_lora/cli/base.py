"""`edge-lora base`: base models from other tools' files — a GGUF file as a Hugging Face model dir."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("base")
def base() -> None:
    """Base models from other tools' files: convert a GGUF file into a model dir edge-lora trains on.

    \b
    Example:  edge-lora base from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2
    """


@base.command("from-gguf")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path), help="The model dir to write.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists (once the new dir is complete).")
def from_gguf_command(file: Path, output: Path, overwrite: bool) -> None:
    """Convert a GGUF file into a Hugging Face model dir: its weights dequantized to float32 safetensors, its
    config, generation config and tokenizer with the chat template, and edge_lora_base.json naming the GGUF
    (sha256, quantization) — the base `edge-lora train --model` takes. The dir appears whole or not at all.

    \b
    Example:  edge-lora base from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2
              edge-lora train --model smollm2 --data train.jsonl --output adapter
    """
    from edge_lora.formats import BASE_SOURCE
    from edge_lora.train.gguf_base import from_gguf

    written = from_gguf(file, output, overwrite=overwrite)
    source = json.loads((written / BASE_SOURCE).read_text())
    click.echo(f"{written}: {source['architecture']} from {source['gguf_file']} ({source['quantization']})")
