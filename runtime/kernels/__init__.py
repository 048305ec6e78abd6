"""edge-lora's own onnxruntime kernels, compiled on the device that runs them.

`matmul_q4` (matmul_q4.cc, the custom op MatMulQ4 in domain ai.edge_lora) is an int4 matmul with int8
activations for x86-64 CPUs with AVX-512 VNNI, with an adapter's LoRA branches computed inside the same node. On
the reference shape, 2 threads, on a quiet host it decodes 1.6–1.8× faster than onnxruntime's MatMulNBits on the
same weights (1.7–1.9× onnxruntime-genai; about 1.4× both when other tenants slowed the host), and an active adapter
(rank 16 on every projection) costs a token 0.2–0.6 ms where the portable graph's separate LoRA MatMuls cost about
3.3 (BENCHMARKS.md, Runtime). An export for a device profile that lists it carries a second graph that uses it (export/kernel_graphs/q4.py).

`lora_add` (lora_add.cc, the custom op LoraAdd) adds an adapter's LoRA branches to a MatMulNBits' output in one
node, where the portable graph spends ~20 onnxruntime nodes a layer on them: portable C++ (GCC's and Clang's
vector extension; int8 → float written for AVX-512, AVX2 and NEON) built for the host (-march=native), for any CPU
that MatMulQ4 does not serve — an Arm board, an AVX2 laptop. On the reference shape, 2 threads, an active adapter
decodes at 0.87–0.94× the merged model where the portable graph's branches gave 0.60–0.70× (BENCHMARKS.md,
Runtime). An `adapters` export for a profile that lists it carries a graph that uses it (export/kernel_graphs/lora_add.py),
over the portable graph's own weights.

`library()` builds an op with the host's C++ compiler once, into a cache keyed by the sources, the flags, the
compiler and (for -march=native) the CPU, and `edge_lora.runtime.load` registers it with the session. Where it
cannot be built (another CPU, no compiler) the runtime runs the next graph the export carries, at last the
portable one.

onnxruntime's wheels carry no C headers: the op is written against the C API alone, and onnxruntime_c_api.h
(version 21, MIT-licensed, from onnxruntime 1.21) is kept here beside it; onnxruntime 1.21 and later serve it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MATMUL_Q4 = "matmul_q4"
LORA_ADD = "lora_add"
DOMAIN = "ai.edge_lora"
TILE = 16  # MatMulQ4's columns per tile
BLOCKS = (32, 64)  # the int4 block sizes (weights per scale) it takes
SRC = HERE / "src"
ORT_HEADERS = HERE / "third_party" / "onnxruntime"
SOURCES = {MATMUL_Q4: SRC / "matmul_q4.cc", LORA_ADD: SRC / "lora_add.cc"}
# The graph format each kernel takes, recorded in export.json beside its graph: a graph in another format (an
# older export) does not run; the next graph the export carries does. matmul_q4 2: float16 scales (1 had fp32 ones, and no "format" key).
FORMATS = {MATMUL_Q4: 2, LORA_ADD: 1}
HEADERS = (ORT_HEADERS / "onnxruntime_c_api.h", SRC / "op_common.h")
BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared"]
# What each op is compiled for. matmul_q4: the instruction sets it needs, named, so that a cached library never
# holds code for another CPU than the flags that cpu_problem() checks. lora_add: the host's own (its cache key
# holds the CPU's description: cpu_signature).
FLAGS = {MATMUL_Q4: BASE_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"],
         LORA_ADD: BASE_FLAGS + ["-march=native"]}
CPU_FLAGS = {MATMUL_Q4: ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"), LORA_ADD: ()}


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here; the message says why."""


def cpu_problem(kernel: str = MATMUL_Q4, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """Why this CPU cannot run `kernel` (None when it can): matmul_q4 needs an x86-64 CPU with AVX-512
    F/BW/VL/VNNI; lora_add any CPU (on Linux, as both)."""
    if sys.platform != "linux":
        return f"edge-lora builds its kernels on Linux only (this is {sys.platform})"
    if not CPU_FLAGS.get(kernel):
        return None
    try:
        text = cpuinfo.read_text()
    except OSError as e:
        return f"{cpuinfo} cannot be read ({e.strerror})"
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    missing = [flag for flag in CPU_FLAGS[kernel] if flag not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


@functools.lru_cache(maxsize=None)
def cpu_signature(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What -march=native compiles for, as /proc/cpuinfo describes it: its model and feature lines, once each
    (x86-64's "model name" and "flags", Arm's "CPU implementer", "CPU part" and "Features")."""
    keys = ("model name", "flags", "cpu family", "model", "cpu implementer", "cpu architecture", "cpu variant",
            "cpu part", "features")
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(sorted({line.strip() for line in lines if line.split(":", 1)[0].strip().lower() in keys}))


def cache_dir() -> Path:
    """$EDGE_LORA_CACHE/kernels, else $XDG_CACHE_HOME/edge-lora/kernels, else ~/.cache/edge-lora/kernels."""
    if os.environ.get("EDGE_LORA_CACHE"):
        return Path(os.environ["EDGE_LORA_CACHE"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-lora" / "kernels"


@functools.lru_cache(maxsize=None)
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
    version = compiler_version(compiler)
    key = hashlib.sha256()
    native = "-march=native" in FLAGS[name]
    for part in (SOURCES[name].read_bytes(), *(h.read_bytes() for h in HEADERS), " ".join(FLAGS[name]).encode(),
                 version.encode(), (cpu_signature() if native else "").encode()):
        key.update(hashlib.sha256(part).digest())
    out = (cache or cache_dir()) / f"{name}-{key.hexdigest()[:16]}" / f"lib{name}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final name and renamed into place: a process loading it never sees half a file
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        result = subprocess.run([compiler, *FLAGS[name], f"-I{ORT_HEADERS}", str(SOURCES[name]), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip()[:200])
            raise KernelUnavailable(f"{compiler} could not build {SOURCES[name].name}: {first}")
        os.replace(built, out)
    return out


# ------------------------------------------------------------------ an adapter in the form MatMulQ4 takes it

def quantize_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A (K, r) and B (r, n) as MatMulQ4 takes them: int8 A with a scale per column, int8 B with a scale per row
    laid out (n/16, r, 16), the two scales' product per rank, and A's scales."""

    def int8(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        scale = np.abs(values).max(axis=axis, keepdims=True).astype(np.float32) / 127
        q = np.round(values / np.where(scale == 0, 1, scale)).astype(np.int8)
        return q, scale.reshape(-1)

    (qa, sa), (qb, sb) = int8(a.astype(np.float32), 0), int8(b.astype(np.float32), 1)
    r, n = b.shape
    qb = qb.reshape(r, n // TILE, TILE).transpose(1, 0, 2)
    return np.ascontiguousarray(qa), np.ascontiguousarray(qb), (sa * sb).astype(np.float32), sa


def lora_blob(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One node's LoRA input from its pairs [(A (K, r), B (r, n)), …] in output order: a 64-byte header of int32
    (pair count, then r and n of each pair), then per pair its scales, A and B, each padded to 64 bytes. No
    pairs: the header alone, which the op reads as no adapter."""
    header = np.zeros(16, dtype=np.int32)
    header[0] = len(pairs)
    parts = []
    for i, (a, b) in enumerate(pairs):
        header[1 + 2 * i], header[2 + 2 * i] = b.shape
        if b.shape[0] == 0:  # rank 0: the adapter leaves this projection alone
            continue
        qa, qb, scale, _ = quantize_pair(a, b)
        for part in (scale.tobytes(), qa.tobytes(), qb.tobytes()):
            parts.append(part + bytes(-len(part) % 64))
    return np.frombuffer(header.tobytes() + b"".join(parts), dtype=np.uint8).copy()


LORA_INPUT = "lora"  # the kernel graph's one LoRA input


def lora_table(blobs: list[np.ndarray]) -> np.ndarray:
    """The kernel graph's LoRA input from its nodes' blobs in slot order: int64 count and count + 1 byte offsets,
    padded to 64 bytes, then each blob on a 64-byte boundary (matmul_q4.cc, find_slot)."""
    head = 8 * (len(blobs) + 2)
    head += -head % 64
    offsets, at = [], head
    for blob in blobs:
        offsets.append(at)
        at += len(blob) + (-len(blob) % 64)
    out = np.zeros(at, dtype=np.uint8)
    out[:8 * (len(blobs) + 2)] = np.frombuffer(np.array([len(blobs), *offsets, at], dtype=np.int64).tobytes(), np.uint8)
    for offset, blob in zip(offsets, blobs):
        out[offset:offset + len(blob)] = blob
    return out


def lora_blobs(tensors: dict[str, np.ndarray], slots: list[list]) -> dict[str, np.ndarray]:
    """An adapter's fp32 A and B ({graph input of the portable graph: array}) as the kernel graph's LoRA input
    ({"lora": table}), `slots` being export.json's kernels.matmul_q4.lora_slots ([[[A name, B name, K, n], …] for
    each node, in slot order]). A projection the adapter leaves out (its file holds neither A nor B) is a pair
    of rank 0."""
    blobs = []
    for node_pairs in slots:
        arrays = []
        for a_name, b_name, k, n in node_pairs:
            if (a_name in tensors) != (b_name in tensors):
                raise ValueError(f"the adapter holds {a_name if a_name in tensors else b_name} without its partner")
            arrays.append((tensors[a_name], tensors[b_name]) if a_name in tensors else
                          (np.zeros((k, 0), np.float32), np.zeros((0, n), np.float32)))
        blobs.append(lora_blob(arrays))
    return {LORA_INPUT: lora_table(blobs)}
