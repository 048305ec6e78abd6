"""What a fused LoRA kernel buys an active adapter (issue 5: "within 10% of the merged model").

    .venv/bin/python bench/runtime.py --systems edge_lora_builder,edge_lora_builder_adapters   # builds the exports
    .venv/bin/python bench/lora_kernel.py                                                     # then this

An `adapters` export of the builder graph adds each LoRA branch as two fp32 MatMuls and an Add beside the int4
projection (630 nodes on SmolLM2-135M's shape, 19.6 MB of A and B read every token). This script builds the
custom op in bench/lora_kernel/lora_add.cc — one node per projection (q, k and v together), A and B in fp16,
converted in registers — rewrites that export to use it, and measures decode in one run, each system in its own
process, rounds in a rotating order, at each of `--threads`:

- `merged`: the merged int4 builder export (`edge-int4-builder-b{N}`), the reference;
- `adapters_fp32`: the adapters export with its adapter bound, as `edge-lora run --adapter` runs it today;
- `adapters_fused`: the same export rewritten to LoraAdd nodes, the same adapter in fp16;
- `fp32_none`, `fused_none`: those two graphs with no adapter bound (every branch at rank 0): what their LoRA
  nodes cost when they have nothing to compute.

It is a measurement: the kernel is not part of the edge-lora package (the LoraAdd that ships, for hosts without
MatMulQ4, is runtime/kernels/src/lora_add.cc: portable, int8 A and B, one LoRA input for the graph). onnxruntime's wheels carry no C headers;
the script takes them from Debian's libonnxruntime-dev 1.21 (API version 21, which onnxruntime 1.21 and later
serve), fetched once into the workdir, or from `--ort-include`, and compiles with the system's C++ compiler
for this CPU (`-march=native`).

Numerics: the fused graph is checked against the adapters graph fed the same fp16-rounded weights (same values,
different summation order). The reference shape's random weights make a chaotic model: the script also reports
how far the adapters graph's own logits move when its adapter is scaled by 1 + 1e-6, the size of differences
that a different summation order can produce; `--shape quick` is a well-conditioned check.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_SOURCE = HERE / "lora_kernel" / "lora_add.cc"
DOMAIN = "ai.edge_lora"
HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
               "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
SYSTEMS = ("merged", "adapters_fp32", "adapters_fused", "fp32_none", "fused_none")
ADAPTER_FILE = Path("adapters") / "adapter.onnx_adapter"


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(2)


# --------------------------------------------------------------------------------------------------- build

def ort_headers(work: Path, given: str | None) -> Path:
    """onnxruntime's C/C++ API headers: `given`, or Debian's package unpacked under `work` (fetched once)."""
    if given:
        include = Path(given)
        if not (include / "onnxruntime_cxx_api.h").exists():
            fail(f"--ort-include {given}: no onnxruntime_cxx_api.h there — give the folder that holds onnxruntime's headers")
        return include
    root = work / "onnxruntime-headers-1.21"
    include = root / "usr" / "include" / "onnxruntime"
    if not include.exists():
        url, sha256 = HEADERS_DEB
        deb = work / Path(url).name
        if not deb.exists():
            print(f"fetching {url}", flush=True)
            urllib.request.urlretrieve(url, deb)
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        if digest != sha256:
            fail(f"{deb}: sha256 {digest}, expected {sha256} — delete it and rerun, or pass --ort-include")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return include


def kernel_path(workdir: Path) -> Path:
    return workdir / "lora_kernel" / "liblora_add.so"


def build_kernel(workdir: Path, include: Path) -> Path:
    out = kernel_path(workdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-std=c++17", "-fPIC", "-shared",
               f"-I{include}", str(KERNEL_SOURCE), "-o", str(out)]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    return out


def fuse_export(src: Path, dst: Path) -> None:
    """Copy the adapters export `src` to `dst` with each projection's LoRA branches (export/graphs/builder.py's
    MatMul → MatMul [→ Concat] → Add) replaced by one LoraAdd node, and its adapter's A and B in fp16."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge_lora.export.adapters import _topological_sort

    proto = onnx.load(str(src / "model.onnx"), load_external_data=False)
    graph = proto.graph
    by_name = {node.name: node for node in graph.node}
    inputs = {value.name: value for value in graph.input}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    dropped, fused = set(), []
    for add in [node for node in graph.node if node.name.endswith("/lora/Add")]:
        scope = add.name.removesuffix("/lora/Add")
        # the branches of this product, in output order (q, k, v for a packed qkv_proj), from their B MatMuls
        ups = [n for n in graph.node if n.name.startswith(scope + "/") and n.name.endswith("/lora_B/MatMul")]
        if len(ups) > 1:
            concat = by_name[f"{scope}/lora/Concat"]
            order = {name: i for i, name in enumerate(concat.input)}
            ups.sort(key=lambda n: order[n.output[0]])
            dropped.add(concat.name)
        node_inputs = [add.input[0], None]
        for up in ups:
            down = by_name[up.name.replace("/lora_B/", "/lora_A/")]
            node_inputs[1] = down.input[0]
            a_name, b_name = down.input[1], up.input[1]
            node_inputs += [a_name, b_name]
            dropped |= {up.name, down.name}
            for name in (a_name, b_name):  # fp16 inputs with fp16 rank-0 defaults
                inputs[name].type.tensor_type.elem_type = TensorProto.FLOAT16
                default = numpy_helper.to_array(initializers[name]).astype(np.float16)
                initializers[name].CopyFrom(numpy_helper.from_array(default, name))
        dropped.add(add.name)
        fused.append(helper.make_node("LoraAdd", node_inputs, list(add.output), name=f"{scope}/lora/LoraAdd", domain=DOMAIN))
    kept = [node for node in graph.node if node.name not in dropped]
    del graph.node[:]
    graph.node.extend(kept + fused)
    _topological_sort(graph)
    proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    shutil.rmtree(dst, ignore_errors=True)
    (dst / ADAPTER_FILE).parent.mkdir(parents=True)
    onnx.save(proto, str(dst / "model.onnx"))
    for path in src.iterdir():
        if path.is_file() and path.name != "model.onnx":
            shutil.copy(path, dst / path.name)
    params = ort.AdapterFormat.read_adapter(str(src / ADAPTER_FILE)).get_parameters()
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    # OrtValue.ortvalue_from_numpy wraps the array without copying: keep the arrays alive until written
    halves = {name: value.numpy().astype(np.float16) for name, value in params.items()}
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in halves.items()})
    fmt.export_adapter(str(dst / ADAPTER_FILE))
    print(f"fused {len(fused)} LoraAdd nodes in place of {len(dropped)} → {dst}", flush=True)


# ------------------------------------------------------------------------------------------------- measure

def open_session(export: Path, threads: int, kernel: Path | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the LoRA inputs are overridable initializers: one warning each otherwise
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if kernel is not None:
        options.register_custom_ops_library(str(kernel))
    return ort.InferenceSession(str(export / "model.onnx"), options, providers=["CPUExecutionProvider"])


def kv_shape(export: Path) -> tuple[int, tuple[int, int]]:
    config = json.loads((export / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"], (config["num_key_value_heads"], head_dim)


def generate(session, export: Path, adapter, prompt: list[int], new_tokens: int) -> float:
    """Greedy decode through edge-lora's builder-graph cache (runtime/cache.py); decode tok/s after the first token."""
    from edge_lora.runtime.cache import SharedCache

    layers, shape = kv_shape(export)
    cache = SharedCache(session, layers, shape, [prompt], new_tokens, adapter)
    token = int(cache.prefill()[0].argmax())
    start = time.perf_counter_ns()
    for n in range(new_tokens - 1):
        token = int(cache.step([token], n)[0].argmax())
    return (new_tokens - 1) / ((time.perf_counter_ns() - start) / 1e9)


def system_paths(work: Path, system: str, block: int) -> tuple[Path, Path | None]:
    """(export dir, adapter file or None) of one system."""
    if system == "merged":
        return work / f"edge-int4-builder-b{block}", None
    export = work / (f"edge-int4-builder-adapters-b{block}" + ("-fused" if "fused" in system else ""))
    return export, None if system.endswith("_none") else export / ADAPTER_FILE


def child(work: Path, args) -> None:
    """One system in this process: warm up, time `--generations`, print the decode tok/s of each as JSON."""
    import numpy as np

    from edge_lora.runtime.lora import map_tensors

    export, adapter_file = system_paths(work, args.child, args.int4_block_size)
    kernel = kernel_path(work.parent) if "fused" in args.child else None
    session = open_session(export, args.child_threads, kernel)
    adapter = map_tensors(adapter_file) if adapter_file else None  # as edge_lora.runtime binds an adapter
    rng = np.random.default_rng(args.seed)
    vocab = json.loads((export / "config.json").read_text())["vocab_size"]
    prompts = [rng.integers(3, vocab, args.prompt_tokens).tolist() for _ in range(args.warmup + args.generations)]
    speeds = [generate(session, export, adapter, p, args.new_tokens) for p in prompts]
    print(json.dumps(speeds[args.warmup:]))


def check_numerics(work: Path, kernel: Path, block: int) -> dict:
    """Prefill logits of the fused graph against the adapters graph fed the same fp16-rounded weights, and of the
    fused graph with no adapter against the adapters graph with none (the base: LoRA adds exact zeros)."""
    import numpy as np
    import onnxruntime as ort

    from edge_lora.runtime.cache import SharedCache
    from edge_lora.runtime.lora import map_tensors

    plain, plain_file = system_paths(work, "adapters_fp32", block)
    fused, fused_file = system_paths(work, "adapters_fused", block)
    weights = map_tensors(plain_file)
    rounded_arrays = {name: v.numpy().astype(np.float16).astype(np.float32) for name, v in weights.items()}
    rounded = {name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in rounded_arrays.items()}  # wraps, no copy
    layers, shape = kv_shape(plain)
    vocab = json.loads((plain / "config.json").read_text())["vocab_size"]
    prompt = np.random.default_rng(0).integers(3, vocab, 64).tolist()

    def logits(export: Path, kernel_path, adapter):
        session = open_session(export, 2, kernel_path)
        return SharedCache(session, layers, shape, [prompt], 1, adapter).prefill()[0]

    with_fp16 = logits(fused, kernel, map_tensors(fused_file))
    reference = logits(plain, None, rounded)
    nudged_arrays = {name: v * np.float32(1 + 1e-6) for name, v in rounded_arrays.items()}
    nudged = logits(plain, None, {name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in nudged_arrays.items()})
    base_fused, base_plain = logits(fused, kernel, None), logits(plain, None, None)
    return {"fused_vs_fp16_rounded_max_abs_logit_diff": float(np.abs(with_fp16 - reference).max()),
            "reference_sensitivity_max_abs_logit_diff": float(np.abs(nudged - reference).max()),
            "fused_vs_fp16_rounded_same_argmax": bool(with_fp16.argmax() == reference.argmax()),
            "adapter_effect_max_abs_logit_diff": float(np.abs(reference - base_plain).max()),  # what is being checked
            "no_adapter_max_abs_logit_diff": float(np.abs(base_fused - base_plain).max())}


def measure(work: Path, args, threads: int) -> dict[str, list[float]]:
    speeds: dict[str, list[float]] = {system: [] for system in SYSTEMS}
    for round_ in range(args.runs):
        order = SYSTEMS[round_ % len(SYSTEMS):] + SYSTEMS[:round_ % len(SYSTEMS)]
        for system in order:
            proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", system, "--child-threads",
                                   str(threads), "--seed", str(round_)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{system} failed:\n{proc.stderr[-3000:]}")
            speeds[system] += json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"threads {threads} round {round_ + 1}/{args.runs}: " + ", ".join(
            f"{s} {statistics.median(v):.1f}" for s, v in speeds.items()), flush=True)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/edge-lora-bench-runtime", help="bench/runtime.py's workdir")
    parser.add_argument("--shape", default="smollm2-135m", help="the shape folder under --workdir (quick: a tiny model)")
    parser.add_argument("--int4-block-size", type=int, default=64, help="which of bench/runtime.py's exports")
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts, one measurement each")
    parser.add_argument("--runs", type=int, default=5, help="rounds (one process per system each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed generations per process")
    parser.add_argument("--generations", type=int, default=3, help="timed generations per process")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ort-include", help="a folder with onnxruntime_cxx_api.h (default: Debian's, fetched once)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.workdir) / args.shape
    if args.child:
        return child(work, args)

    for system in SYSTEMS[:2]:
        export, _ = system_paths(work, system, args.int4_block_size)
        if not export.exists():
            fail(f"{export} does not exist — build it first: .venv/bin/python bench/runtime.py --workdir {args.workdir} "
                 f"--int4-block-size {args.int4_block_size} --systems edge_lora_builder,edge_lora_builder_adapters")
    threads = [int(t) for t in args.threads.split(",")]
    kernel = build_kernel(Path(args.workdir), ort_headers(Path(args.workdir), args.ort_include))
    plain, _ = system_paths(work, "adapters_fp32", args.int4_block_size)
    fuse_export(plain, system_paths(work, "adapters_fused", args.int4_block_size)[0])
    result = {"shape": args.shape, "int4_block_size": args.int4_block_size, "runs": args.runs,
              "generations_per_run": args.generations, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, **check_numerics(work, kernel, args.int4_block_size)}
    load = []
    for t in threads:
        load.append(os.getloadavg()[0])
        speeds = measure(work, args, t)
        load.append(os.getloadavg()[0])
        medians = {system: round(statistics.median(v), 1) for system, v in speeds.items()}
        result[f"threads_{t}"] = {
            **{f"{system}_decode_tok_s": value for system, value in medians.items()},
            "fp32_vs_merged": round(medians["adapters_fp32"] / medians["merged"], 3),
            "fused_vs_merged": round(medians["adapters_fused"] / medians["merged"], 3),
            "fused_vs_fp32": round(medians["adapters_fused"] / medians["adapters_fp32"], 3),
            "fp32_none_vs_merged": round(medians["fp32_none"] / medians["merged"], 3),
            "fused_none_vs_merged": round(medians["fused_none"] / medians["merged"], 3),
        }
    result["loadavg_1min_min_max"] = [min(load), max(load)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
