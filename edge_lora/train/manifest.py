"""The adapter manifest, `edge_lora.json`: what a trained adapter was made from and how."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from edge_lora.formats import ADAPTER_MANIFEST, BASE_SOURCE, AdapterManifest

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
    """edge_lora.json of `adapter_dir`; AdapterError, naming the fix, when the dir or its manifest is missing or bad."""
    return AdapterManifest.load(adapter_dir)
