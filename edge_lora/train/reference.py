"""The PyTorch models an export is made from and checked against."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from edge_lora.errors import UsageError
from edge_lora.formats import AdapterManifest
from edge_lora.train import manifest as adapter_manifest
from edge_lora.train.config import QuantConfig
from edge_lora.train.qlora import load_quantized_base, resolve_model_dir


def base_dir_of(adapter_dir: Path, manifest: AdapterManifest, base: str | None, force: bool) -> Path:
    """The base model dir: `base` if given (its fingerprint must match the adapter's unless `force`)."""
    model_dir = resolve_model_dir(base or manifest.base_model)
    if base is not None and not force:
        expected = manifest.base_digest
        actual = adapter_manifest.fingerprint(model_dir)["digest"]
        if actual != expected:
            raise UsageError(
                f"--base {base} has fingerprint {actual[:12]}… but {adapter_dir} was trained on "
                f"{manifest.base_model} ({expected[:12]}…) — pass that base, or --force to export anyway"
            )
    return model_dir


def qlora_model(
    adapter_dirs: Path | list[Path], model_dir: Path, manifest: AdapterManifest, names: list[str] | None = None
):
    """The trained model: the base as training held it — 4-bit, quantized as for training, or, for a foreign
    adapter trained on a full-precision base, that base in its training dtype (`base_dtype`) — with the
    adapter(s) on top, in eval mode, computing in fp32. Several adapters load side by side under `names`, the
    first one active.

    fp32 even when training computed in bf16 or fp16: the weights are the same, and the reference is then
    exact, so that a parity figure measures the export alone and not the training dtype's rounding as well.
    """
    if not held_in_4bit(manifest):
        return with_adapters(full_precision_base(model_dir, base_dtype(manifest)), adapter_dirs, names)
    quant = QuantConfig(**manifest.training["quant"] | {"compute_dtype": "float32"})
    return with_adapters(load_quantized_base(model_dir, quant), adapter_dirs, names)


def held_in_4bit(manifest: AdapterManifest) -> bool:
    """Whether training held the base in 4-bit (edge-lora always; a foreign adapter when --trained-on nf4/fp4)."""
    return manifest.training["quant"] is not None


def base_dtype(manifest: AdapterManifest) -> str:
    """The dtype the base's weights were held in during training when they were not 4-bit ("float32" else)."""
    return manifest.training.get("base_dtype") or "float32"


def fp32_twin(quantized, model_dir: Path, adapter_dirs: Path | list[Path], names: list[str] | None = None):
    """The model `quantized` (from qlora_model) computes, as plain fp32 layers: the full-precision base holding
    the 4-bit weights dequantized, with the same adapters on top.

    On a CPU bitsandbytes computes a 4-bit layer in fp32 as dequantize-then-matmul, so the twin gives the same
    logits without dequantizing every weight again at every token — several times faster for the parity
    gate's greedy runs. The gate checks the twin against `quantized` before trusting it (see parity.check).
    """
    import torch

    from edge_lora.train.qlora import dequantized_weights

    base = full_precision_base(model_dir)
    with torch.no_grad():
        for name, weight in dequantized_weights(quantized).items():
            base.get_parameter(name).copy_(weight)
    return with_adapters(base, adapter_dirs, names)


def with_adapters(base, adapter_dirs: Path | list[Path], names: list[str] | None = None):
    """`base` with the adapters of `adapter_dirs` loaded under `names` (the first one active), in eval mode."""
    from peft import PeftModel

    dirs = adapter_dirs if isinstance(adapter_dirs, (list, tuple)) else [adapter_dirs]
    names = names or ["default"]
    with adapter_fits(dirs[0]):
        model = PeftModel.from_pretrained(base, dirs[0], adapter_name=names[0], strict_adapter_check="error")
    for name, adapter_dir in zip(names[1:], dirs[1:]):
        # PEFT's own check counts another adapter's keys as missing when this one's name is a substring of them
        # ("b" in "base_model"): only keys of this file that fit no module are a misfit
        with adapter_fits(adapter_dir):
            loaded = model.load_adapter(adapter_dir, adapter_name=name, strict_adapter_check="ignore")
            if loaded.unexpected_keys:
                raise RuntimeError(f"unexpected adapter keys: {loaded.unexpected_keys}")
    model.set_adapter(names[0])
    return model.eval()


@contextmanager
def adapter_fits(adapter_dir: Path):
    """PEFT's refusal of an adapter that does not fit the base — target modules it lacks, tensors for modules it
    does not have, tensors of other shapes — as one line naming the
    adapter dir, the first misfit and the fix."""
    try:
        yield
    except (ValueError, RuntimeError) as e:
        message = str(e)
        key = re.search(r"(missing|unexpected) adapter keys: \['([^']+)'", message)
        if "not found in the base model" in message:
            misfit = message.split(". ")[0]
        elif key:
            misfit = f"{key[1]} adapter key {key[2]}"
        elif "size mismatch" in message:
            misfit = "tensor shapes differ"
        else:
            raise
        raise UsageError(
            f"{adapter_dir} does not fit this base ({misfit}) — pass the base it was trained on with --base"
        ) from None


def full_precision_base(model_dir: Path, dtype: str = "float32"):
    """The base model computing in fp32, its weights as held in `dtype` (rounded to it, then widened)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.float().eval()
