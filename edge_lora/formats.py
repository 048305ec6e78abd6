"""The vocabulary the stages share, and the typed manifests they hand each other (docs/formats.md lists every key).

    AdapterManifest   edge_lora.json in an adapter dir (edge-lora train writes it, export and eval read it)
    ExportManifest    export.json in an export dir (edge-lora export writes it, the runtime reads it)
    ProfileReport     profile.json (edge-lora profile writes it, `profile compare` reads it)

Each has `load` (read, check, and raise one error whose one line names the file, the problem and the fix), `save`
and `to_dict`. Keys this version does not know are kept and written back. Standard library only: the runtime, the
devices loader and the CLI import this module without pulling in a training library.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from edge_lora.records import ManifestError, Record, read_json, write_json

Precision = Literal["fp32", "fp16", "int8", "int4"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
Flavor = Literal["merged", "adapters"]
"""merged: LoRA folded into the weights; adapters: one base graph and an adapter file each, chosen at run time."""
FLAVORS: tuple[Flavor, ...] = get_args(Flavor)
Graph = Literal["torch", "builder", "auto", "optimum"]
"""Who writes the graph: torch's ONNX exporter, onnxruntime-genai's model builder, or "auto", the builder where it
applies. "optimum" is what exports written by optimum's exporter record (before transformers 5): a graph with the
same inputs and outputs as torch's, run the same way; nothing writes it now."""
GRAPHS: tuple[Graph, ...] = ("torch", "builder", "auto")
"""The graph writers an export can ask for."""

MATMUL_Q4 = "matmul_q4"  # edge-lora's int4 matmul with the LoRA branches inside (edge_lora.runtime.kernels)
LORA_ADD = "lora_add"  # edge-lora's op adding a projection's LoRA branches after onnxruntime's int4 matmul
KERNELS = (MATMUL_Q4, LORA_ADD)
"""edge-lora's own onnxruntime ops, in the order the runtime prefers their graphs; a device profile lists some."""

DEFAULT_DEVICE = "cpu-x86-64"
"""The device profile used when none is named: a generic CPU (also the one for architectures with no profile)."""

# A base model dir converted from a GGUF file (edge-lora base from-gguf): where its weights came from.
BASE_SOURCE = "edge_lora_base.json"
# The adapter dir (edge-lora train): PEFT's files and edge-lora's manifest beside them.
ADAPTER_MANIFEST = "edge_lora.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's name for the adapter's tensors
# The export dir (edge-lora export).
EXPORT_MANIFEST = "export.json"
PORTABLE_GRAPH = "model.onnx"  # the graph every onnxruntime runs
Q4_GRAPH = "model.q4.onnx"  # the same weights for edge-lora's MatMulQ4 op (edge_lora.runtime.kernels)
LORA_GRAPH = "model.lora.onnx"  # the portable graph with each projection's LoRA branches in one LoraAdd node
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"  # the base's; its eos ids add to the model config's
ADAPTER_SUFFIX = ".onnx_adapter"  # onnxruntime's adapter format, one file per adapter of an `adapters` export
KERNEL_ADAPTER_SUFFIX = ".q4.onnx_adapter"  # an adapter as the kernel graphs' one LoRA input takes it
# A builder graph's overridable initializer in front of the head: -1 runs the head on the last position alone,
# 0 on every position (edge_lora.export.graphs.builder writes it, edge_lora.runtime.cache binds it).
LOGITS_START = "logits_start"
# profile.json (edge-lora profile): its schema name and the version `profile compare` reads.
PROFILE_REPORT = "profile.json"
PROFILE_SCHEMA = "edge-lora/profile"
PROFILE_SCHEMA_VERSION = 3


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in 4 MB chunks: what manifests record of each file they list."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class AdapterError(ManifestError):
    """The adapter dir is missing or its edge_lora.json unreadable; the message says which and how to fix it."""


class ExportError(ManifestError):
    """The export directory is missing, incomplete or altered; the message says which and how to fix it."""


class ProfileError(ManifestError):
    """Settings or reports the profiler cannot work with; the message says which value and how to fix it."""


# ---- edge_lora.json ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterManifest(Record):
    """What an adapter dir was trained from and how: enough to rebuild the trained model and check a base."""

    error: ClassVar = AdapterError
    fix: ClassVar = "retrain with edge-lora train or restore the file"

    base_model: str
    """The base model dir or hub id training loaded."""
    base_fingerprint: dict[str, Any]
    """{"digest": sha256 over config, tensor names/shapes and weights, ...}: what a --base must match."""
    training: dict[str, Any]
    """TrainConfig as a dict (its "quant" entry rebuilds the 4-bit base)."""
    lora: dict[str, Any]
    format_version: int = 1
    kind: str = "adapter"
    quantization: dict[str, Any] = field(default_factory=dict)
    data_card: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    distributed: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    foreign: dict[str, Any] | None = None
    """Set on the manifest `edge-lora export` builds in memory for an adapter dir without edge_lora.json (a PEFT
    adapter from another tool): {"trained_on", "adapter_config_sha256", "peft_version"}. Never written to disk."""

    @property
    def base_digest(self) -> str:
        return self.base_fingerprint.get("digest", "")

    @property
    def eval_data_path(self) -> Path | None:
        """The eval file training recorded, if it named one and it still exists."""
        record = (self.data or {}).get("eval")
        path = Path(record["path"]) if isinstance(record, dict) and record.get("path") else None
        return path if path is not None and path.exists() else None

    @classmethod
    def load(cls, adapter_dir: str | Path) -> AdapterManifest:
        adapter_dir = Path(adapter_dir)
        if not adapter_dir.is_dir():
            raise AdapterError(f"adapter dir {adapter_dir} does not exist — pass the --output dir of edge-lora train")
        path = adapter_dir / ADAPTER_MANIFEST
        if not path.exists():
            raise AdapterError(f"{adapter_dir} has no {ADAPTER_MANIFEST} — pass a dir written by edge-lora train")
        return cls.from_dict(read_json(path, AdapterError, cls.fix), str(path))

    def save(self, adapter_dir: str | Path) -> Path:
        return write_json(self, Path(adapter_dir) / ADAPTER_MANIFEST)


# ---- export.json ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVCache(Record):
    """How the graph's KV cache is laid out and named."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    layout: str = "(batch, kv_heads, seq, head_dim)"
    past_names: str = "past_key_values.{layer}.{key|value}"
    present_names: str = "present.{layer}.{key|value}"
    shared_buffer: bool = False
    """A builder graph's: one buffer per layer and kind, preallocated and bound as both past and present."""


@dataclass(frozen=True)
class AdapterFile(Record):
    """One adapter of an `adapters` export, as a graph takes it."""

    file: str
    """Its file, relative to the export dir."""


@dataclass(frozen=True)
class KernelGraph(Record):
    """A graph for edge-lora's own ops, written beside the portable one over the same weights."""

    model_file: str
    format: int = 1
    """The op's input format the graph was written for; the runtime skips a graph of another format."""
    adapters: dict[str, AdapterFile] = field(default_factory=dict)
    data_files: tuple[str, ...] = ()
    """External data files it shares with another graph (the portable graph's weights)."""
    lora_slots: list[Any] | None = None
    weight_bytes: int | None = None
    weight_bytes_per_token: int | None = None


@dataclass(frozen=True)
class ExportManifest(Record):
    """What an export dir holds and how the runtime runs it; `files` lists every file with its sha256."""

    error: ClassVar = ExportError
    fix: ClassVar = "re-run edge-lora export"

    model_file: str
    files: dict[str, str]
    kv_cache: KVCache
    flavor: Flavor = "merged"
    graph: Graph = "optimum"
    precision: Precision = "fp32"
    format_version: int = 1
    kind: str = "export"
    opset: int | None = None
    device: str | None = None
    """The device profile the export was made for."""
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    vocab_size: int | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    adapters: dict[str, AdapterFile] = field(default_factory=dict)
    kernels: dict[str, KernelGraph] = field(default_factory=dict)
    """{kernel name: its graph}, in the order the runtime prefers them."""
    weight_bytes: int | None = None
    weight_bytes_per_token: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    source_adapter: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    """The parity gate's reports by what was checked: "merged", or each adapter and "base"; each kernel graph's."""
    parity_reference: dict[str, Any] | None = None
    """Which PyTorch model the gate compared with, and how close its fp32 twin was."""
    merge: dict[str, Any] | None = None
    """What the adapter was merged into, and how far each choice is from the trained model."""
    lineage: dict[str, Any] | None = None
    """The adapters the export was made from (paths, digests, base, data) and the export's settings."""
    foreign: dict[str, Any] | None = None
    """{adapter name: its manifest's `foreign`} for each adapter that came without edge_lora.json; absent when
    every adapter was trained by edge-lora."""
    versions: dict[str, str] = field(default_factory=dict)

    def graph_entry(self, kernel: str | None = None) -> ExportManifest | KernelGraph:
        """The portable graph's entry (None) or `kernel`'s: model_file, adapters, weight bytes."""
        return self.kernels[kernel] if kernel else self

    @property
    def data_files(self) -> tuple[str, ...]:
        """The portable graph shares no other graph's data files (a KernelGraph's may name the portable one's)."""
        return ()

    @property
    def has_logits(self) -> bool:
        return any(o.get("name") == "logits" for o in self.outputs)

    @classmethod
    def load(cls, export_dir: str | Path) -> ExportManifest:
        export_dir = Path(export_dir)
        if not export_dir.is_dir():
            raise ExportError(f"export dir {export_dir} does not exist — pass the --output dir of edge-lora export")
        path = export_dir / EXPORT_MANIFEST
        if not path.exists():
            raise ExportError(
                f"{export_dir} is not an export: no {EXPORT_MANIFEST} — pass a dir written by edge-lora export"
            )
        return cls.from_dict(read_json(path, ExportError, cls.fix), str(path))

    def save(self, export_dir: str | Path) -> Path:
        return write_json(self, Path(export_dir) / EXPORT_MANIFEST)


# ---- profile.json --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileReport(Record):
    """One `edge-lora profile` run: the host, the device profile, the exports, the settings, and per configuration
    (export x adapter x provider x threads x prompt length) every raw sample and the summary."""

    error: ClassVar = ProfileError
    fix: ClassVar = "pass a profile.json written by edge-lora profile"

    schema: str
    schema_version: int
    host: dict[str, Any]
    device_profile: dict[str, Any]
    exports: list[dict[str, Any]]
    settings: dict[str, Any]
    configurations: list[dict[str, Any]]
    created: str = ""

    @classmethod
    def from_dict(cls, doc: object, where: str) -> ProfileReport:
        schema = doc.get("schema") if isinstance(doc, dict) else None
        if schema != PROFILE_SCHEMA:
            raise ProfileError(
                f"{where} is not a profile report: schema {schema!r}, expected {PROFILE_SCHEMA!r} — {cls.fix}"
            )
        if doc.get("schema_version") != PROFILE_SCHEMA_VERSION:
            raise ProfileError(
                f"{where} has schema_version {doc.get('schema_version')!r}, expected "
                f"{PROFILE_SCHEMA_VERSION} — profile again with this edge-lora to compare it"
            )
        return super().from_dict(doc, where)

    @classmethod
    def load(cls, path: str | Path) -> ProfileReport:
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"{path} does not exist — {cls.fix}")
        return cls.from_dict(read_json(path, ProfileError, cls.fix), str(path))

    def save(self, path: str | Path) -> Path:
        return write_json(self, Path(path))
