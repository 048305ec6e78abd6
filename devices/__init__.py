"""Device profiles: one TOML file per device class next to this module, their loader, and host detection.

Stdlib only: the runtime imports this on devices that have neither numpy nor torch. The keys a profile
must have and the values they allow are listed once, in ``_SCHEMA``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from edge_lora.formats import DEFAULT_DEVICE, Flavor, Graph, Precision

__all__ = [
    "DeviceProfile",
    "DeviceProfileError",
    "HostInfo",
    "KERNELS",
    "KNOWN_PROVIDERS",
    "Provider",
    "closest",
    "detect",
    "load",
    "load_all",
    "names",
    "resolve_threads",
]

GraphOptimization = Literal["disable", "basic", "extended", "all"]

# onnxruntime.get_all_providers() of onnxruntime 1.32, so that a misspelt name fails when the profile loads
# rather than when a session is built on the device.
KNOWN_PROVIDERS = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider", "DnnlExecutionProvider", "VitisAIExecutionProvider", "QNNExecutionProvider",
    "NnapiExecutionProvider", "VSINPUExecutionProvider", "JsExecutionProvider", "CoreMLExecutionProvider",
    "DmlExecutionProvider", "RknpuExecutionProvider", "WebNNExecutionProvider", "WebGpuExecutionProvider",
    "XnnpackExecutionProvider", "CANNExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider",
)

# edge-lora's own onnxruntime kernels (edge_lora.runtime.kernels) that a profile may allow.
KERNELS = ("matmul_q4", "lora_add")

_HERE = Path(__file__).parent


class DeviceProfileError(ValueError):
    """A device profile that cannot be found, read or validated; the message is one line."""


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
    """Who writes the graph: "optimum" (optimum's exporter, every architecture), "builder" (onnxruntime-genai's
    model builder: fused attention, an in-place KV cache; Llama family, fp32 or int4) or "auto" (the
    builder where it applies, optimum otherwise)."""
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
        problems = _problems(self.to_dict(), self.path)
        if problems:
            raise _error(self.path, problems)

    def to_dict(self) -> dict:
        """The profile as its TOML document (path left out), e.g. to record in export.json or a report."""
        doc: dict = {}
        for field, (key, _, _) in _SCHEMA.items():
            value = getattr(self, field)
            if field == "providers":
                value = [{"name": p.name, "options": dict(p.options)} for p in value]
            elif field == "kernels":
                value = list(value)
            if key in _OPTIONAL and value == _OPTIONAL[key]:
                continue  # left out, as a profile that does not set it leaves it out
            section, _, leaf = key.rpartition(".")
            (doc.setdefault(section, {}) if section else doc)[leaf] = value
        return doc


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """What detect() found on this machine."""

    cpu_model: str
    """CPU model name from /proc/cpuinfo; platform.processor() where there is none."""
    arch: str
    """"x86_64" or "aarch64" (AMD64 and arm64 are renamed to these), else platform.machine() in lower case."""
    cpu_flags: tuple[str, ...]
    """Instruction-set extensions onnxruntime's CPU kernels choose between, from: avx2, avx_vnni, avx512f,
    avx512_vnni, avx512_bf16, amx, neon, dotprod, i8mm, sve."""
    physical_cores: int
    """Physical cores this process may run on."""
    logical_cores: int
    """Logical CPUs (hardware threads) this process may run on."""
    memory_mb: int
    """Total RAM in MiB; 0 where it cannot be read (Windows)."""
    os: str
    """Operating system and kernel release, e.g. "Linux 6.8.0"; "Android ..." on Android."""
    available_providers: tuple[str, ...]
    """onnxruntime.get_available_providers() as passed to detect()."""
    measured_bandwidth_gbs: float
    """Single-thread memcpy bandwidth in GB/s, bytes read plus bytes written (see _measure_bandwidth)."""
    closest_profile: str
    """Name of the shipped profile closest to this host (see closest())."""


def names() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(path.stem for path in _HERE.glob("*.toml"))


def load(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A shipped profile by name, or the profile in a .toml file at a path."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or os.sep in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise DeviceProfileError(
                f"{path}: no such file; give the path of a .toml file or a shipped profile: {', '.join(names())}"
            )
    elif text in names():
        path = _HERE / f"{text}.toml"
    else:
        raise DeviceProfileError(
            f"unknown device profile {_show(text)}: use one of {', '.join(names())}, or the path of a .toml file"
        )
    text = path.read_text(encoding="utf-8")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends "(at line L, column C)"
        raise DeviceProfileError(f"{path}: not valid TOML: {err}") from err
    problems = _problems(doc, path)
    if problems:
        raise _error(path, problems, _key_lines(text))
    values = {field: _get(doc, key) for field, (key, _, _) in _SCHEMA.items()}
    values = {field: _OPTIONAL[_SCHEMA[field][0]] if value is _MISSING else value for field, value in values.items()}
    values["providers"] = tuple(Provider(p["name"], p["options"]) for p in values["providers"])
    values["kernels"] = tuple(values["kernels"])
    return DeviceProfile(**values, path=path)


def load_all() -> list[DeviceProfile]:
    """Every shipped profile, in name order."""
    return [load(name) for name in names()]


def resolve_threads(profile: DeviceProfile, physical_cores: int) -> int:
    """The intra-op thread count to use: the profile's, or one per physical core when it is 0.

    onnxruntime reads 0 the same way; resolving it here lets reports record the number actually used.
    """
    return profile.intra_op_threads or physical_cores


def detect(available_providers: list[str]) -> HostInfo:
    """Describe this machine, in well under 2 s: most of it goes to faulting in and copying 512 MiB of buffers.

    available_providers is onnxruntime.get_available_providers(), passed in so that this module stays stdlib-only.
    """
    cpuinfo = _cpuinfo()
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    first = cpuinfo[0] if cpuinfo else {}
    words = set((first.get("flags") or first.get("Features") or "").split())  # x86 says flags, Arm says Features
    flags = {_CPU_FLAGS[word] for word in words if word in _CPU_FLAGS}
    if not cpuinfo and arch == "aarch64":
        flags.add("neon")  # NEON is mandatory in AArch64, so it is known without /proc/cpuinfo
    model = next((block[key] for key in ("model name", "Model") for block in cpuinfo if key in block), "")

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    logical = len(allowed) if allowed else os.cpu_count() or 1
    cores = {
        (block.get("physical id"), block["core id"])
        for block in cpuinfo
        if "core id" in block and (allowed is None or int(block["processor"]) in allowed)
    }
    os_name = "Android" if "ANDROID_ROOT" in os.environ else platform.system()  # Android reports "Linux"

    host = HostInfo(
        cpu_model=model or platform.processor() or machine,
        arch=arch,
        cpu_flags=tuple(sorted(flags)),
        physical_cores=len(cores) or logical,  # Arm's cpuinfo has no core ids, and its cores have no SMT
        logical_cores=logical,
        memory_mb=_memory_mb(),
        os=f"{os_name} {platform.release()}",
        available_providers=tuple(available_providers),
        measured_bandwidth_gbs=_measure_bandwidth(),
        closest_profile="",
    )
    return dataclasses.replace(host, closest_profile=closest(host))


def closest(host: HostInfo) -> str:
    """Name of the shipped profile closest to host, judged by its onnxruntime providers, OS and architecture."""
    providers = set(host.available_providers)
    if providers & {"CUDAExecutionProvider", "TensorrtExecutionProvider"}:
        return "jetson-orin" if host.arch == "aarch64" else "nvidia-gpu"  # CUDA on an Arm board: a Jetson
    if "QNNExecutionProvider" in providers:
        return "snapdragon-htp"
    if "OpenVINOExecutionProvider" in providers:
        return "intel-core-ultra"
    if "CoreMLExecutionProvider" in providers or (host.os.startswith("Darwin") and host.arch == "aarch64"):
        return "apple-silicon"
    if "NnapiExecutionProvider" in providers or host.os.startswith("Android"):
        return "android-phone"
    if host.arch == "aarch64":
        return "arm64-a76"
    return DEFAULT_DEVICE  # also the generic CPU-only profile for any other architecture


# --- checking a profile -------------------------------------------------------------------------------------

def _show(value: object) -> str:
    """A value as TOML-like text for messages ("int3", true, 4)."""
    return json.dumps(value, default=str)


def _one_of(allowed: tuple) -> tuple[str, Callable[[object], bool]]:
    # Comparing types as well keeps true from passing as 1.
    expected = "one of " + ", ".join(map(_show, allowed))
    return expected, lambda v: type(v) is type(allowed[0]) and v in allowed


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


_TEXT = ("a non-empty string", _is_text)

# DeviceProfile field -> (its key in the TOML file, what a valid value looks like, the test of one).
# The order is the dataclass's and the file's.
_SCHEMA: dict[str, tuple[str, str, Callable[[object], bool]]] = {
    "name": ("name", *_TEXT),
    "description": ("description", *_TEXT),
    "providers": (
        "runtime.providers",
        'a non-empty list of tables like { name = "CPUExecutionProvider", options = {} }, highest priority first',
        lambda v: isinstance(v, list) and v != [] and all(isinstance(entry, dict) for entry in v),
    ),
    "intra_op_threads": (
        "runtime.intra_op_threads",
        "an integer >= 0 (0: one thread per physical core)",
        lambda v: _is_int(v) and v >= 0,
    ),
    "graph_optimization": ("runtime.graph_optimization", *_one_of(get_args(GraphOptimization))),
    "kernels": (
        "runtime.kernels",
        f"a list of edge-lora kernels, each one of {', '.join(KERNELS)} (or [])",
        lambda v: isinstance(v, list) and all(k in KERNELS for k in v),
    ),
    "precision": ("export.precision", *_one_of(get_args(Precision))),
    "flavor": ("export.flavor", *_one_of(get_args(Flavor))),
    "opset": ("export.opset", "an integer from 14 to 21", lambda v: _is_int(v) and 14 <= v <= 21),
    "graph": ("export.graph", *_one_of(get_args(Graph))),
    "int4_block_size": ("export.int4_block_size", *_one_of((16, 32, 64, 128))),
    "int4_accuracy_level": ("export.int4_accuracy_level", *_one_of((0, 1, 2, 3, 4))),
    "budget_mb": ("memory.budget_mb", "an integer > 0 (MiB)", lambda v: _is_int(v) and v > 0),
    "bandwidth_gbs": (
        "memory.bandwidth_gbs",
        "a number > 0 (GB/s)",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
    ),
    "bandwidth_source": ("memory.bandwidth_source", *_TEXT),
    "notes": ("notes.text", *_TEXT),
}

_MISSING = object()
_OPTIONAL = {"runtime.kernels": []}  # keys a profile may leave out, with the value they then take


def _get(doc: dict, key: str) -> object:
    for part in key.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return _MISSING
        doc = doc[part]
    return doc


def _problems(doc: dict, path: Path) -> list[tuple[str, str]]:
    """Every problem with a profile's TOML document as (its key, a message naming the key, the value and what is
    allowed)."""
    problems = []
    for key, expected, ok in _SCHEMA.values():
        value = _get(doc, key)
        if value is _MISSING and key in _OPTIONAL:
            continue
        if value is _MISSING:
            problems.append((key, f"{key} is missing: add it, {expected}"))
        elif not ok(value):
            problems.append((key, f"{key} = {_show(value)}: expected {expected}"))
        elif key == "runtime.providers":
            problems += [(key, problem) for problem in _provider_problems(key, value)]
    name = doc.get("name")
    if _is_text(name) and name != path.stem:
        problems.append(("name", f"name = {_show(name)}: expected {_show(path.stem)}, the file name without .toml"))
    return problems + _unknown_keys(doc)


def _provider_problems(key: str, providers: list[dict]) -> list[str]:
    problems, seen = [], set()
    for i, entry in enumerate(providers):
        where = f"{key}[{i}]"
        if set(entry) != {"name", "options"}:
            problems.append(f"{where} = {_show(entry)}: expected exactly the keys name and options")
            continue
        name, options = entry["name"], entry["options"]
        if name not in KNOWN_PROVIDERS:
            problems.append(f"{where}.name = {_show(name)}: expected one of {', '.join(KNOWN_PROVIDERS)}")
        elif name in seen:
            problems.append(f"{where}.name = {_show(name)}: listed twice; keep one entry per provider")
        seen.add(name)
        if not isinstance(options, dict) or not all(
            isinstance(option, (str, int, float, bool)) for option in options.values()
        ):
            problems.append(
                f"{where}.options = {_show(options)}: expected a table of string, integer, float or boolean values"
            )
    return problems


def _unknown_keys(doc: dict) -> list[tuple[str, str]]:
    """Keys the schema does not have, usually misspellings that would otherwise be ignored."""
    keys = [key for key, _, _ in _SCHEMA.values()]
    sections = list(dict.fromkeys(key.partition(".")[0] for key in keys if "." in key))
    problems = []
    for top, value in doc.items():
        if top in sections and not isinstance(value, dict):
            problems.append((top, f"{top} = {_show(value)}: expected a table [{top}]"))
            continue
        for key in [f"{top}.{sub}" for sub in value] if top in sections else [top]:
            if key not in keys:
                section = key.rpartition(".")[0]
                known = [k for k in keys if k.rpartition(".")[0] == section]
                known += [] if section else [f"[{s}]" for s in sections]
                problems.append((key, f"unknown key {key}: remove it or fix its spelling (known here: {', '.join(known)})"))
    return problems


def _error(path: Path, problems: list[tuple[str, str]], lines: dict[str, int] | None = None) -> DeviceProfileError:
    """One line: the file, then each problem, after the line of the file that sets its key where that is known."""
    lines = lines or {}
    return DeviceProfileError(f"{path}: " + "; ".join(f"line {lines[key]}: {message}" if key in lines else message
                                                      for key, message in problems))


_TABLE_LINE = re.compile(r"\[\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")
_KEY_LINE = re.compile(r"([A-Za-z0-9_-]+)\s*=")
_MULTILINE_STRINGS = ("'''", '"""')


def _key_lines(text: str) -> dict[str, int]:
    """The line (from 1) that sets each key of a profile's TOML text: {"name": 1, "export.precision": 12, ...}.

    tomllib gives values without their positions, so the lines are found in the text: a [table] header opens a
    section, and a line that starts "key =" sets section.key. The lines of a multi-line string are skipped, so
    that notes text such as "threads = 4" does not pass for a key.
    """
    lines: dict[str, int] = {}
    section, closing = "", None  # closing: the quotes that end the multi-line string being skipped
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if closing is not None:
            closing = None if closing in stripped else closing
            continue
        if table := _TABLE_LINE.match(stripped):
            section = table[1]
        elif key := _KEY_LINE.match(stripped):
            lines.setdefault(f"{section}.{key[1]}" if section else key[1], number)
            value = stripped[key.end():].strip()
            if value[:3] in _MULTILINE_STRINGS and value[:3] not in value[3:]:
                closing = value[:3]
    return lines


# --- looking at the host ------------------------------------------------------------------------------------

# /proc/cpuinfo spelling -> the name reported in HostInfo.cpu_flags
_CPU_FLAGS = {
    "avx2": "avx2",
    "avx_vnni": "avx_vnni",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx",
    "asimd": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
}

# Far beyond the last-level cache one core can use, so the copy streams through DRAM.
_BANDWIDTH_BYTES = 256 * 2**20


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per block (each processor; on Arm boards also a trailing board block)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return []
    blocks = []
    for chunk in text.split("\n\n"):
        pairs = (line.split(":", 1) for line in chunk.splitlines() if ":" in line)
        block = {key.strip(): value.strip() for key, value in pairs}
        if block:
            blocks.append(block)
    return blocks


def _memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024  # the line reads "MemTotal: 24684084 kB"
    except OSError:  # not Linux
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20  # macOS and other Unixes
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return 0


def _measure_bandwidth(repeats: int = 5) -> float:
    """Best-of-`repeats` single-thread memcpy of 256 MiB, in GB/s of bytes read plus bytes written.

    This counts like STREAM's Copy kernel. One core cannot saturate most memory systems, so it is a lower
    bound on what a multi-threaded decode can draw: a sanity check for a profile's bandwidth_gbs, not STREAM.
    """
    src = bytearray(b"\x5a") * _BANDWIDTH_BYTES  # written, so it is backed by real pages, not the zero page
    dst = memoryview(bytearray(_BANDWIDTH_BYTES))
    best_ns = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        dst[:] = src  # a single memcpy; the first one also faults dst's pages in, which best-of discards
        best_ns = min(best_ns, time.perf_counter_ns() - start)
    return 2 * _BANDWIDTH_BYTES / best_ns  # bytes per nanosecond is GB/s
