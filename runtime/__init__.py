"""The torch-free runtime: load an export and generate on onnxruntime.

Imports only onnxruntime, numpy, tokenizers and edge_lora.devices — never torch, transformers, peft or the
training and export code — so that `pip install edge-lora` is enough on a device.
"""

from __future__ import annotations

from edge_lora.runtime.chat import ChatError
from edge_lora.runtime.generate import Generation, Generator, PromptError, SamplingConfig
from edge_lora.runtime.load import DEFAULT_DEVICE, device_profile, load
from edge_lora.runtime.package import ExportDir, ExportError, open_export
from edge_lora.runtime.session import ProviderError
from edge_lora.runtime.tokenizer import TextTokenizer

__all__ = [
    "load",
    "DEFAULT_DEVICE",
    "TextTokenizer",
    "device_profile",
    "Generator",
    "Generation",
    "SamplingConfig",
    "ExportDir",
    "ExportError",
    "PromptError",
    "ProviderError",
    "ChatError",
    "open_export",
]
