"""A device profile as the code uses it (DeviceProfile, Provider), and the shipped profiles: the TOML files
beside this module, found by name and loaded through the schema's checks (devices/schema.py)."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

from edge_lora.devices import schema
from edge_lora.devices.schema import DeviceProfileError, GraphOptimization
from edge_lora.formats import Flavor, Graph, Precision

HERE = Path(__file__).parent  # the shipped profiles' folder


@dataclasses.dataclass(frozen=True)
class Provider:
    """One onnxruntime execution provider with its options, as InferenceSession(providers=...) takes it."""

    name: str
    """Provider name as onnxruntime spells it, e.g. "CUDAExecutionProvider"."""
    options: dict[str, str | int | float | bool]
    """Provider options; onnxruntime hands each value to the provider as a string."""


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """How to export for, and run on, one device class. Built by load(); checked on construction."""

    name: str
    """Profile name; equals the TOML file's name without ".toml"."""
    description: str
    """The device class in one line."""
    providers: tuple[Provider, ...]
    """Execution providers, highest priority first: onnxruntime gives each node to the first that takes it."""
    intra_op_threads: int
    """onnxruntime intra-op threads; 0 means one per physical core of the host (see resolve_threads)."""
    graph_optimization: GraphOptimization
    """onnxruntime graph optimization level."""
    kernels: tuple[str, ...]
    """edge-lora's own kernels this device class may run (optional, default none): an export for the profile
    carries a graph that uses them, and the runtime takes it where the kernel builds on the host."""
    precision: Precision
    """Weight precision that `edge-lora export --device NAME` uses unless --precision is given."""
    flavor: Flavor
    """"merged": LoRA folded into the weights; "adapters": base graph plus adapter files chosen at run time."""
    opset: int
    """Opset of the default ONNX domain, 14 to 21."""
    graph: Graph
    """Who writes the graph: "torch" (torch's ONNX exporter, every architecture edge-lora exports), "builder"
    (onnxruntime-genai's model builder: fused attention, an in-place KV cache; Llama family, Phi-3 and Gemma, fp32 or
    int4) or "auto" (the builder where it applies, torch's exporter otherwise)."""
    int4_block_size: int
    """Weights per quantization block in int4 MatMulNBits: 16, 32, 64 or 128."""
    int4_accuracy_level: int
    """MatMulNBits accuracy_level, the least precise type activations may be computed in:
    0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8."""
    budget_mb: int
    """RAM or VRAM the model (weights, KV cache, activations) may use, in MiB."""
    bandwidth_gbs: float
    """Sustained memory bandwidth in GB/s; decode tokens/s <= bandwidth / bytes read per token."""
    bandwidth_source: str
    """Where bandwidth_gbs comes from, and whether it is a peak, an estimate or a measurement."""
    notes: str
    """Practical notes for this device class."""
    path: Path
    """The TOML file this profile was read from."""

    def __post_init__(self) -> None:
        # Checked here as well as in load() so that dataclasses.replace() cannot build an invalid profile.
        found = schema.problems(self.to_dict(), self.path)
        if found:
            raise schema.error(self.path, found)

    def to_dict(self) -> dict:
        """The profile as its TOML document (path left out), e.g. to record in export.json or a report."""
        doc: dict = {}
        for field, (key, _, _) in schema.SCHEMA.items():
            value = getattr(self, field)
            if field == "providers":
                value = [{"name": p.name, "options": dict(p.options)} for p in value]
            elif field == "kernels":
                value = list(value)
            if key in schema.OPTIONAL and value == schema.OPTIONAL[key]:
                continue  # left out, as a profile that does not set it leaves it out
            section, _, leaf = key.rpartition(".")
            (doc.setdefault(section, {}) if section else doc)[leaf] = value
        return doc


def names() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(path.stem for path in HERE.glob("*.toml"))


def load(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A shipped profile by name, or the profile in a .toml file at a path."""
    path = _find(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends "(at line L, column C)"
        raise DeviceProfileError(f"{path}: not valid TOML: {err}") from err
    found = schema.problems(doc, path)
    if found:
        raise schema.error(path, found, schema.key_lines(text))
    values = {field: schema.get(doc, key) for field, (key, _, _) in schema.SCHEMA.items()}
    values = {
        field: schema.OPTIONAL[schema.SCHEMA[field][0]] if value is schema.MISSING else value
        for field, value in values.items()
    }
    values["providers"] = tuple(Provider(p["name"], p["options"]) for p in values["providers"])
    values["kernels"] = tuple(values["kernels"])
    return DeviceProfile(**values, path=path)


def _find(name_or_path: str | os.PathLike) -> Path:
    """The file load() reads: a path as given (it must exist), else the shipped profile of that name."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or os.sep in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise DeviceProfileError(
                f"{path}: no such file; give the path of a .toml file or a shipped profile: {', '.join(names())}"
            )
        return path
    if text in names():
        return HERE / f"{text}.toml"
    raise DeviceProfileError(
        f"unknown device profile {schema.show(text)}: use one of {', '.join(names())}, or the path of a .toml file"
    )


def load_all() -> list[DeviceProfile]:
    """Every shipped profile, in name order."""
    return [load(name) for name in names()]


def resolve_threads(profile: DeviceProfile, physical_cores: int) -> int:
    """The intra-op thread count to use: the profile's, or one per physical core when it is 0.

    onnxruntime reads 0 the same way; resolving it here lets reports record the number actually used.
    """
    return profile.intra_op_threads or physical_cores
