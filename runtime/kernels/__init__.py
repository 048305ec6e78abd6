"""edge-lora's own onnxruntime kernels, compiled on the device that runs them.

`matmul_q4` (src/matmul_q4.cc, the custom op MatMulQ4 in domain ai.edge_lora) is an int4 matmul with int8
activations for x86-64 CPUs with AVX-512 VNNI, with an adapter's LoRA branches computed inside the same node: it
decodes faster than onnxruntime's MatMulNBits on the same weights, and an active adapter costs a token a fraction
of what the portable graph's separate LoRA MatMuls cost (BENCHMARKS.md, Runtime). An export for a device profile
that lists it carries a second graph that uses it (export/kernel_graphs/q4.py).

`lora_add` (src/lora_add.cc, the custom op LoraAdd) adds an adapter's LoRA branches to a MatMulNBits' output in
one node, where the portable graph spends ~20 onnxruntime nodes a layer on them: portable C++ (GCC's and Clang's
vector extension; int8 → float written for AVX-512, AVX2 and NEON) built for the host (-march=native), for any
CPU that MatMulQ4 does not serve — an Arm board, an AVX2 laptop. An active adapter decodes closer to the merged
model's speed than on the portable graph's branches (BENCHMARKS.md, Runtime). An `adapters` export for a profile
that lists it carries a graph that uses it (export/kernel_graphs/lora_add.py), over the portable graph's own
weights.

build.py: `library()` builds an op with the host's C++ compiler once, into a cache keyed by the sources, the
flags, the compiler and (for -march=native) the CPU, and `edge_lora.runtime.load` registers it with the session.
Where it cannot be built (another CPU, no compiler) the runtime runs the next graph the export carries, at last
the portable one. blobs.py: the byte layout of the LoRA input both ops read.

onnxruntime's wheels carry no C headers: the ops are written against the C API alone, and
third_party/onnxruntime/onnxruntime_c_api.h (MIT-licensed; the release it comes from is in VERSION there) is kept
here beside them; onnxruntime 1.21 and later serve it.
"""

from __future__ import annotations

from edge_lora.formats import LORA_ADD, MATMUL_Q4

DOMAIN = "ai.edge_lora"
TILE = 16  # MatMulQ4's columns per tile, and the LoRA blob's B
BLOCKS = (32, 64)  # the int4 block sizes (weights per scale) MatMulQ4 takes
LORA_INPUT = "lora"  # the kernel graph's one LoRA input
# The graph format each kernel takes, recorded in export.json beside its graph: a graph in another format does
# not run; the next graph the export carries does. matmul_q4's format 2 has float16 scales; an entry without a
# "format" key is format 1.
FORMATS = {MATMUL_Q4: 2, LORA_ADD: 1}

# build.py and blobs.py import the names above from this package, so they are imported after them.
from edge_lora.runtime.kernels.blobs import lora_blob, lora_blobs, lora_table, quantize_pair  # noqa: E402
from edge_lora.runtime.kernels.build import (  # noqa: E402
    CPU_FLAGS,
    FLAGS,
    HEADERS,
    ORT_HEADERS,
    SOURCES,
    SRC,
    KernelUnavailable,
    cache_dir,
    compiler_version,
    cpu_problem,
    cpu_signature,
    library,
)

__all__ = [
    "BLOCKS",
    "CPU_FLAGS",
    "DOMAIN",
    "FLAGS",
    "FORMATS",
    "HEADERS",
    "LORA_ADD",
    "LORA_INPUT",
    "MATMUL_Q4",
    "ORT_HEADERS",
    "SOURCES",
    "SRC",
    "TILE",
    "KernelUnavailable",
    "cache_dir",
    "compiler_version",
    "cpu_problem",
    "cpu_signature",
    "library",
    "lora_blob",
    "lora_blobs",
    "lora_table",
    "quantize_pair",
]
