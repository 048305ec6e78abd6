"""Export benchmark: edge-lora's export (merge → ONNX with KV cache → quantize → parity gate) against
onnxruntime-genai's model builder CLI on the same merged weights, at the reference shape (SmolLM2-135M-shaped
Llama, random weights).

    .venv/bin/python bench/export.py            # the reference shape
    .venv/bin/python bench/export.py --quick    # a tiny model, under a minute

Each export runs in its own subprocess, timed from start to exit, its peak RSS its own (ru_maxrss of the child).
edge-lora's fp32 run includes its parity gate (a PyTorch 4-bit + LoRA reference against onnxruntime); the
builder CLI (`python -m onnxruntime_genai.models.builder -i MERGED -o OUT -p fp32 -e cpu`, what a user runs to get
an onnxruntime graph of a merged model) validates nothing. The int4 runs skip the gate (see below).
Both of edge-lora's graph writers are measured: the default (graph auto: onnxruntime-genai's model builder for this
Llama), the int4 export `--device cpu-x86-64` writes (blocks of 64), and torch's exporter (`--graph torch`,
what architectures the builder lacks get). Target: int4 ≤ 30% of the fp32 size. The time ratio against the
builder CLI is reported, not gated: the CLI writes a graph of weights already merged, where edge-lora's export
also loads the trained 4-bit model, merges and proves parity. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_lora.formats import ExportManifest
from edge_lora.tiny import SMOLLM2_135M_SHAPE

# The reference shape (SmolLM2-135M's), and a tiny one for checking the script.
REFERENCE = SMOLLM2_135M_SHAPE
QUICK = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    tie_word_embeddings=True,
    max_position_embeddings=256,
)


def timed(cmd: list[str]) -> dict:
    """Run a command; its wall time and its own peak RSS (os.wait4 returns the rusage of that child alone)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{stderr[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss is in KiB


def size_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("model.onnx")) / 1e6


def setup(work: Path, shape: dict) -> tuple[Path, Path, Path]:
    """Base model dir, a 2-step adapter on it, and the merged fp32 model dir the builder CLI exports."""
    from edge_lora.demo.task import write_task
    from edge_lora.tiny import build_base_model, llama_config

    base = build_base_model(work / "base", llama_config(**shape))
    train_path, _ = write_task(work / "data", n_train=16, n_eval=4)
    adapter = work / "adapter"
    code = (
        "from edge_lora.train.config import TrainConfig; from edge_lora.train.loop import train; "
        f"train(TrainConfig(model={str(base)!r}, data={str(train_path)!r}, output={str(adapter)!r}, max_steps=2, "
        "batch_size=4, learning_rate=1e-3), show_progress=False)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    merged = work / "merged"
    code = (
        "import torch; from pathlib import Path; from edge_lora.formats import AdapterManifest; "
        "from edge_lora.train.reference import qlora_model, full_precision_base; "
        "from edge_lora.export.merge import merged_weights; "
        f"a, b = Path({str(adapter)!r}), Path({str(base)!r}); m = AdapterManifest.load(a); "
        "ref = qlora_model(a, b, m); fp = full_precision_base(b)\n"
        "with torch.no_grad():\n"
        "    [fp.get_parameter(k).copy_(v) for k, v in merged_weights(ref).items()]\n"
        f"fp.save_pretrained({str(merged)!r})\n"
        "from transformers import AutoTokenizer\n"
        f"AutoTokenizer.from_pretrained(b).save_pretrained({str(merged)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return base, adapter, merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model instead of the reference shape")
    args = parser.parse_args()

    shape = QUICK if args.quick else REFERENCE
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        base, adapter, merged = setup(work, shape)
        print(f"setup (base, 2-step adapter, merged copy): {time.perf_counter() - t0:.1f} s", flush=True)
        edge = [sys.executable, "-m", "edge_lora", "export", str(adapter), "--quiet"]
        results = {
            "builder_cli_fp32": timed(
                [
                    sys.executable,
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    str(merged),
                    "-o",
                    str(work / "builder-cli-fp32"),
                    "-p",
                    "fp32",
                    "-e",
                    "cpu",
                    "-c",
                    str(work / "builder-cache"),
                ]
            ),
            # The default graph (auto: onnxruntime-genai's model builder for this Llama), fp32 with its gate.
            "edge_lora_fp32": timed([*edge, "--output", str(work / "edge-fp32"), "--precision", "fp32"]),
            # int4 without its gate: on random weights with a 2-step adapter the next-token distributions are
            # nearly flat, so int4 rounding flips greedy near-ties; the gate is for trained models (tests, demo).
            "edge_lora_int4": timed(
                [*edge, "--output", str(work / "edge-int4"), "--precision", "int4", "--no-validate"]
            ),
            # What `--device cpu-x86-64` writes (graph auto, int4 in blocks of 64), without the gate.
            "edge_lora_device_int4": timed(
                [*edge, "--output", str(work / "device-int4"), "--device", "cpu-x86-64", "--no-validate"]
            ),
            # torch's graph, what every architecture the builder lacks gets: fp32 with its gate, int4 without.
            "edge_lora_torch_graph_fp32": timed(
                [*edge, "--output", str(work / "torch-graph-fp32"), "--precision", "fp32", "--graph", "torch"]
            ),
            "edge_lora_torch_graph_int4": timed(
                [
                    *edge,
                    "--output",
                    str(work / "torch-graph-int4"),
                    "--precision",
                    "int4",
                    "--graph",
                    "torch",
                    "--no-validate",
                ]
            ),
        }
        sizes = {
            name: size_mb(work / d)
            for name, d in (
                ("builder_cli_fp32", "builder-cli-fp32"),
                ("edge_lora_fp32", "edge-fp32"),
                ("edge_lora_int4", "edge-int4"),
                ("edge_lora_device_int4", "device-int4"),
                ("edge_lora_torch_graph_fp32", "torch-graph-fp32"),
                ("edge_lora_torch_graph_int4", "torch-graph-int4"),
            )
        }
        parity = ExportManifest.load(work / "edge-fp32").parity["merged"]
        torch_graph_parity = ExportManifest.load(work / "torch-graph-fp32").parity["merged"]
    for name, r in results.items():
        print(f"{name:29} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']} MB  size {sizes[name]:8.1f} MB")
    for name, p in (("default (builder) graph", parity), ("torch graph", torch_graph_parity)):
        print(
            f"parity fp32, {name}: max |Δlogit| {p['max_abs_logit_diff']:.2e}, "
            f"greedy agreement {p['greedy_agreement']:.1%}"
        )
    print(
        json.dumps(
            {
                "shape": "quick" if args.quick else "smollm2-135m",
                **{f"{k}_s": v["seconds"] for k, v in results.items()},
                **{f"{k}_peak_rss_mb": v["peak_rss_mb"] for k, v in results.items()},
                **{f"{k}_mb": round(v, 1) for k, v in sizes.items()},
                "int4_size_vs_fp32": round(sizes["edge_lora_int4"] / sizes["edge_lora_fp32"], 3),
                "device_int4_size_vs_fp32": round(sizes["edge_lora_device_int4"] / sizes["edge_lora_fp32"], 3),
                "edge_fp32_time_vs_builder_cli": round(
                    results["edge_lora_fp32"]["seconds"] / results["builder_cli_fp32"]["seconds"], 3
                ),
                "torch_graph_int4_size_vs_fp32": round(
                    sizes["edge_lora_torch_graph_int4"] / sizes["edge_lora_torch_graph_fp32"], 3
                ),
                "torch_graph_fp32_time_vs_builder_cli": round(
                    results["edge_lora_torch_graph_fp32"]["seconds"] / results["builder_cli_fp32"]["seconds"], 3
                ),
                "fp32_max_abs_logit_diff": parity["max_abs_logit_diff"],
                "fp32_greedy_agreement": parity["greedy_agreement"],
                "torch_graph_fp32_max_abs_logit_diff": torch_graph_parity["max_abs_logit_diff"],
                "torch_graph_fp32_greedy_agreement": torch_graph_parity["greedy_agreement"],
            }
        )
    )


if __name__ == "__main__":
    main()
