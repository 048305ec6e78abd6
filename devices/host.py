"""The machine this runs on: its CPU (read from /proc/cpuinfo, here only), memory and single-thread memory
bandwidth, and the shipped profile closest to it.

edge_lora.runtime.kernels asks this module for the CPU's flags (can a kernel run here?) and for the lines of
/proc/cpuinfo that name what -march=native compiles for (its build cache's key).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path

from edge_lora.formats import DEFAULT_DEVICE

CPUINFO = Path("/proc/cpuinfo")

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

# The keys (in lower case) of the /proc/cpuinfo lines that say what -march=native compiles for: x86-64's
# "model name" and "flags", Arm's "CPU implementer", "CPU part" and "Features".
_SIGNATURE_KEYS = (
    "model name",
    "flags",
    "cpu family",
    "model",
    "cpu implementer",
    "cpu architecture",
    "cpu variant",
    "cpu part",
    "features",
)

# Far beyond the last-level cache one core can use, so the copy streams through DRAM.
_BANDWIDTH_BYTES = 256 * 2**20


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


# --- /proc/cpuinfo -------------------------------------------------------------------------------------------


def cpuinfo(path: Path = CPUINFO) -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per block (each processor; on Arm boards also a trailing board block).
    OSError where the file cannot be read (not Linux)."""
    blocks = []
    for chunk in path.read_text().split("\n\n"):
        pairs = (line.split(":", 1) for line in chunk.splitlines() if ":" in line)
        block = {key.strip(): value.strip() for key, value in pairs}
        if block:
            blocks.append(block)
    return blocks


def _flag_words(blocks: list[dict[str, str]]) -> set[str]:
    first = blocks[0] if blocks else {}
    return set((first.get("flags") or first.get("Features") or "").split())  # x86 says flags, Arm says Features


def cpu_flags(path: Path = CPUINFO) -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo spells them ("avx512_vnni", "asimddp"): the first processor's
    flags line on x86-64, its Features line on Arm. OSError where the file cannot be read."""
    return _flag_words(cpuinfo(path))


def cpu_signature_lines(path: Path = CPUINFO) -> list[str]:
    """The lines of /proc/cpuinfo that say what -march=native compiles for, stripped, once each and sorted: the
    model and feature lines, not the clock. OSError where the file cannot be read."""
    lines = path.read_text().splitlines()
    return sorted({line.strip() for line in lines if line.split(":", 1)[0].strip().lower() in _SIGNATURE_KEYS})


# --- the host ------------------------------------------------------------------------------------------------


def detect(available_providers: list[str]) -> HostInfo:
    """Describe this machine, in well under 2 s: most of it goes to faulting in and copying 512 MiB of buffers.

    available_providers is onnxruntime.get_available_providers(), passed in so that this module stays stdlib-only.
    """
    try:
        blocks = cpuinfo()
    except OSError:  # not Linux
        blocks = []
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    flags = {_CPU_FLAGS[word] for word in _flag_words(blocks) if word in _CPU_FLAGS}
    if not blocks and arch == "aarch64":
        flags.add("neon")  # NEON is mandatory in AArch64, so it is known without /proc/cpuinfo
    model = next((block[key] for key in ("model name", "Model") for block in blocks if key in block), "")
    physical, logical = _cores(blocks)
    os_name = "Android" if "ANDROID_ROOT" in os.environ else platform.system()  # Android reports "Linux"

    host = HostInfo(
        cpu_model=model or platform.processor() or machine,
        arch=arch,
        cpu_flags=tuple(sorted(flags)),
        physical_cores=physical,
        logical_cores=logical,
        memory_mb=_memory_mb(),
        os=f"{os_name} {platform.release()}",
        available_providers=tuple(available_providers),
        measured_bandwidth_gbs=_measure_bandwidth(),
        closest_profile="",
    )
    return dataclasses.replace(host, closest_profile=closest(host))


def _cores(blocks: list[dict[str, str]]) -> tuple[int, int]:
    """(physical cores, logical CPUs) this process may run on."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    logical = len(allowed) if allowed else os.cpu_count() or 1
    cores = {
        (block.get("physical id"), block["core id"])
        for block in blocks
        if "core id" in block and (allowed is None or int(block["processor"]) in allowed)
    }
    return len(cores) or logical, logical  # Arm's cpuinfo has no core ids, and its cores have no SMT


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
