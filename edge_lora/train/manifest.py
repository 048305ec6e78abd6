"""The adapter manifest, `edge_lora.json`: what a trained adapter was made from and how."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from edge_lora.formats import ADAPTER_MANIFEST, BASE_SOURCE, AdapterManifest, sha256_file

FORMAT_VERSION = 1
LIBRARIES = ("edge-lora", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors")
# Keys of config.json that describe how a model was saved, not what it computes.
VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "quantization_config"}


def fingerprint(model_dir: str | Path) -> dict:
    """Identity of a base model: its config, its tensor names and shapes, and a digest of its weight files. A dir
    converted from a GGUF file (BASE_SOURCE) also names the file's sha256 and quantization, beside the digest: the
    digest itself is computed as for any dir, so adapters of a dir keep matching it."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config = {k: v for k, v in sorted(config.items()) if k not in VOLATILE_CONFIG_KEYS}
    shapes: dict[str, list[int]] = {}
    weights = hashlib.sha256()
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shapes[name] = list(f.get_slice(name).get_shape())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                weights.update(chunk)
    config_digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    shapes_digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    weights_digest = weights.hexdigest()
    identity = {
        "digest": hashlib.sha256(f"{config_digest}{shapes_digest}{weights_digest}".encode()).hexdigest(),
        "config_sha256": config_digest,
        "tensors_sha256": shapes_digest,
        "weights_sha256": weights_digest,
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "num_tensors": len(shapes),
    }
    source = model_dir / BASE_SOURCE
    if source.is_file():
        gguf = json.loads(source.read_text())
        identity["gguf_sha256"] = gguf.get("gguf_sha256")
        identity["gguf_quantization"] = gguf.get("quantization")
    return identity


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write(adapter_dir: Path, fields: dict) -> Path:
    """edge_lora.json of `adapter_dir` from `fields`, checked as readers read it (AdapterManifest); its path."""
    record = {"format_version": FORMAT_VERSION, **fields}
    return AdapterManifest.from_dict(record, str(Path(adapter_dir) / ADAPTER_MANIFEST)).save(adapter_dir)


def read(adapter_dir: str | Path) -> AdapterManifest:
    """edge_lora.json of `adapter_dir`; AdapterError, naming the fix, when the dir or its manifest is missing or bad.

    A PEFT adapter dir without edge_lora.json (another tool's) has no record of how its base was held in
    training: `edge-lora export` describes it with `foreign` instead, from the flags it is given.
    """
    return AdapterManifest.load(adapter_dir)


PEFT_CONFIG = "adapter_config.json"  # PEFT's adapter settings, beside ADAPTER_WEIGHTS
TRAINED_ON = ("nf4", "fp4", "bf16", "fp16", "fp32")
"""How a foreign adapter's base was held in training: 4-bit (bitsandbytes, QLoRA) or a full-precision dtype."""
FULL_PRECISION = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def foreign(
    adapter_dir: Path,
    base_model: str,
    base_fingerprint: dict,
    trained_on: str,
    double_quant: bool = True,
    compute_dtype: str = "auto",
) -> AdapterManifest:
    """The manifest `edge-lora train` would have written for the PEFT adapter in `adapter_dir` (no edge_lora.json):
    its LoRA settings from adapter_config.json, its base and that base's fingerprint as given, and how the base
    was held in training from `trained_on` — 4-bit ("nf4", "fp4", bitsandbytes' default block size of 64, as
    PEFT, TRL, Unsloth and axolotl load it) or a full-precision dtype ("bf16", "fp16", "fp32"; training["quant"]
    None and training["base_dtype"] the torch dtype). Marked `foreign`; built in memory, never written."""
    from edge_lora.train.config import QuantConfig

    config_path = Path(adapter_dir) / PEFT_CONFIG
    config = json.loads(config_path.read_text())
    if trained_on in FULL_PRECISION:
        training = {"quant": None, "base_dtype": FULL_PRECISION[trained_on]}
    else:
        quant = QuantConfig(quant_type=trained_on, double_quant=double_quant, compute_dtype=compute_dtype)
        training = {"quant": dict(quant.__dict__)}
    targets = config.get("target_modules")
    lora = {
        "r": config.get("r", 8),
        "alpha": config.get("lora_alpha", 8),
        "dropout": config.get("lora_dropout", 0.0),
        "target_modules": [targets] if isinstance(targets, str) else sorted(targets or []),
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
    }
    return AdapterManifest(
        base_model=base_model,
        base_fingerprint=base_fingerprint,
        training=training,
        lora=lora,
        foreign={
            "trained_on": trained_on,
            "adapter_config_sha256": sha256_file(config_path),
            "peft_version": config.get("peft_version"),
        },
    )
