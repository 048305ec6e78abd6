"""Flavor `adapters`: one `.onnx_adapter` file per adapter (onnxruntime's AdapterFormat) beside one base graph
whose LoRA A/B weights are graph inputs (export/graphs/lora_inputs.py), so that adapters trained on one base share
one base model on a device. Each file holds, per adapted layer, A (in, r) and B (r, out) = (B_peft · scaling)ᵀ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_lora.export.graphs.lora_inputs import input_names
from edge_lora.formats import ADAPTER_SUFFIX, AdapterManifest


def adapter_tensors(peft_model, adapter: str, dtype=np.float32) -> dict[str, np.ndarray]:
    """{graph input name: value} of one adapter: Aᵀ (in, r) and (B · scaling)ᵀ (r, out) per adapted layer."""
    from peft.tuners.lora import LoraLayer

    from edge_lora.export.merge import MergeError
    from edge_lora.train.qlora import base_param_name

    tensors = {}
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter):
            raise MergeError(
                f"{name}: DoRA adapters cannot be kept apart (their magnitudes rescale the base weight) — "
                "export them with --flavor merged"
            )
        a_name, b_name = input_names(base_param_name(name).removesuffix(".weight"))
        a = layer.lora_A[adapter].weight.detach().float()  # (r, in)
        b = layer.lora_B[adapter].weight.detach().float() * layer.scaling[adapter]  # (out, r)
        tensors[a_name] = a.T.contiguous().numpy().astype(dtype)
        tensors[b_name] = b.T.contiguous().numpy().astype(dtype)
    return tensors


def write_adapter(tensors: dict[str, np.ndarray], path: Path) -> Path:
    """`tensors` ({graph input name: value}) as an .onnx_adapter file at `path`."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in tensors.items()})
    fmt.export_adapter(str(path))
    return path


def write_adapters(
    export_dir: Path, peft_model, names: list[str], dirs: list[Path], manifests: list[AdapterManifest], precision: str
) -> dict:
    """adapters/<name>.onnx_adapter for each adapter of `peft_model`; their entries for export.json."""
    (export_dir / "adapters").mkdir()
    dtype = np.float16 if precision == "fp16" else np.float32  # the graph's LoRA inputs' type
    entries = {}
    for name, adapter_dir, manifest in zip(names, dirs, manifests):
        tensors = adapter_tensors(peft_model, name, dtype)
        file = f"adapters/{name}{ADAPTER_SUFFIX}"
        write_adapter(tensors, export_dir / file)
        entries[name] = {
            "file": file,
            "inputs": sorted(tensors),
            "source_adapter": str(adapter_dir.resolve()),
            "lora": manifest.lora,
            "base_fingerprint": manifest.base_digest,
        }
    return entries
