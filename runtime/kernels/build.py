"""Building a kernel on the host: whether its CPU can run it, the compiler and flags, and the cache of built
libraries, keyed by the sources, the flags, the compiler and (for -march=native) the CPU."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_lora.devices import host
from edge_lora.runtime.kernels import LORA_ADD, MATMUL_Q4

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
ORT_HEADERS = HERE / "third_party" / "onnxruntime"
SOURCES = {MATMUL_Q4: SRC / "matmul_q4.cc", LORA_ADD: SRC / "lora_add.cc"}
HEADERS = (ORT_HEADERS / "onnxruntime_c_api.h", SRC / "op_common.h")
BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared"]
# What each op is compiled for. matmul_q4: the instruction sets it needs, named, so that a cached library never
# holds code for another CPU than the flags that cpu_problem() checks. lora_add: the host's own (its cache key
# holds the CPU's description: cpu_signature).
FLAGS = {
    MATMUL_Q4: BASE_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"],
    LORA_ADD: BASE_FLAGS + ["-march=native"],
}
CPU_FLAGS = {MATMUL_Q4: ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"), LORA_ADD: ()}


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here; the message says why."""


def cpu_problem(kernel: str = MATMUL_Q4, cpuinfo: Path = host.CPUINFO) -> str | None:
    """Why this CPU cannot run `kernel` (None when it can): matmul_q4 needs an x86-64 CPU with AVX-512
    F/BW/VL/VNNI; lora_add any CPU (on Linux, as both)."""
    if sys.platform != "linux":
        return f"edge-lora builds its kernels on Linux only (this is {sys.platform})"
    if not CPU_FLAGS.get(kernel):
        return None
    try:
        flags = host.cpu_flags(cpuinfo)
    except OSError as e:
        return f"{cpuinfo} cannot be read ({e.strerror})"
    missing = [flag for flag in CPU_FLAGS[kernel] if flag not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


@functools.cache
def cpu_signature(cpuinfo: Path = host.CPUINFO) -> str:
    """What -march=native compiles for, as /proc/cpuinfo describes it: its model and feature lines, once each
    (x86-64's "model name" and "flags", Arm's "CPU implementer", "CPU part" and "Features"); "" where the file
    cannot be read."""
    try:
        return "\n".join(host.cpu_signature_lines(cpuinfo))
    except OSError:
        return ""


def cache_dir() -> Path:
    """$EDGE_LORA_CACHE/kernels, else $XDG_CACHE_HOME/edge-lora/kernels, else ~/.cache/edge-lora/kernels."""
    if os.environ.get("EDGE_LORA_CACHE"):
        return Path(os.environ["EDGE_LORA_CACHE"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-lora" / "kernels"


@functools.cache
def compiler_version(compiler: str) -> str:
    """`compiler --version`, part of a library's cache key: asked once a process, not at every load."""
    return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout


def library(name: str = MATMUL_Q4, cache: Path | None = None) -> Path:
    """The compiled kernel library, built on first use with $CXX (default c++); KernelUnavailable says why not."""
    if name not in SOURCES:
        raise KernelUnavailable(f"unknown kernel {name!r} — known: {', '.join(SOURCES)}")
    problem = cpu_problem(name)
    if problem:
        raise KernelUnavailable(problem)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler {compiler!r} on PATH — install g++ or clang++, or set CXX")
    out = (cache or cache_dir()) / f"{name}-{_cache_key(name, compiler)}" / f"lib{name}.so"
    if not out.exists():
        _compile(name, compiler, out)
    return out


def _cache_key(name: str, compiler: str) -> str:
    """16 hex digits of a hash of what the library is built from: sources, headers, flags, compiler, CPU."""
    key = hashlib.sha256()
    native = "-march=native" in FLAGS[name]
    for part in (
        SOURCES[name].read_bytes(),
        *(h.read_bytes() for h in HEADERS),
        " ".join(FLAGS[name]).encode(),
        compiler_version(compiler).encode(),
        (cpu_signature() if native else "").encode(),
    ):
        key.update(hashlib.sha256(part).digest())
    return key.hexdigest()[:16]


def _compile(name: str, compiler: str, out: Path) -> None:
    """Build the library at `out`, beside its final name and renamed into place: a process loading it never sees
    half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        result = subprocess.run(
            [compiler, *FLAGS[name], f"-I{ORT_HEADERS}", str(SOURCES[name]), "-o", str(built)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip()[:200])
            raise KernelUnavailable(f"{compiler} could not build {SOURCES[name].name}: {first}")
        os.replace(built, out)
