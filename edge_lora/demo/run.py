"""`edge-lora demo`: the whole job on a tiny model, offline — build, QLoRA-train, export, run, report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_lora.demo.runtime_check import LATENCY_SETTINGS
from edge_lora.demo.task import write_task
from edge_lora.errors import UsageError
from edge_lora.formats import PORTABLE_GRAPH
from edge_lora.train import manifest as adapter_manifest
from edge_lora.train.config import QuantConfig, TrainConfig

# A short QLoRA recipe: the date task converges in a few hundred steps. fp32 even on a CPU with bf16: at the demo
# model's width (hidden 128) bf16's casts cost more than its matmuls save; at hidden 512 bf16 is the faster
# (BENCHMARKS.md, Training).
DEMO_TRAINING = dict(
    max_steps=300,
    batch_size=32,
    learning_rate=2e-3,
    warmup_steps=20,
    log_every=20,
    seed=0,
    quant=QuantConfig(compute_dtype="float32"),
)
MAX_NEW_TOKENS = 16  # a completion is 11 characters plus </s>
PRECISIONS = ("fp32", "int4")
GATE_POINTS = 2.0  # the int4-against-fp32 regression gate's margin, in percentage points of exact match


class DemoStepError(RuntimeError):
    """A demo step failed; the earlier steps' outputs stay in the workdir."""


def run_demo(workdir: str | Path, console: Console | None = None, training_overrides: dict | None = None) -> dict:
    """Run every step, print the table, write summary.json; returns the summary."""
    console = console or Console()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = Steps(workdir, console)

    base_dir = steps.run("build a tiny Llama base and its tokenizer", build_base, workdir)
    train_path, eval_path = steps.run("write the date-reformatting task", write_task, workdir / "data")
    config = TrainConfig(
        model=str(base_dir),
        data=str(train_path),
        eval_data=str(eval_path),
        output=str(workdir / "adapter"),
        **(DEMO_TRAINING | (training_overrides or {})),
    )
    adapter_dir = steps.run("QLoRA training (NF4 base, LoRA on all linear layers)", train_adapter, config)
    torch_acc = steps.run(
        "held-out accuracy in PyTorch (base, QLoRA)", torch_accuracy, base_dir, adapter_dir, eval_path
    )
    exports = {}
    for precision in PRECISIONS:
        exports[precision] = steps.run(
            f"merge and export ONNX {precision}",
            export_adapter,
            adapter_dir,
            workdir / f"export-{precision}",
            precision,
        )
    onnx = {}
    for precision, export_dir in exports.items():
        onnx[precision] = steps.run(
            f"run ONNX {precision} on edge_lora.runtime (no torch)", runtime_check, export_dir, eval_path
        )
    gate = steps.run(
        "regression gate: ONNX int4 against fp32 on the same prompts",
        regression_gate,
        onnx["fp32"],
        onnx["int4"],
        eval_path,
    )

    summary = summarize(config, adapter_dir, torch_acc, exports, onnx, gate, steps.seconds, started)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(summary_table(summary))
    console.print(gate["line"])
    console.print(f"summary written to {workdir / 'summary.json'}; total {summary['total_seconds']} s")
    return summary


def summarize(
    config: TrainConfig,
    adapter_dir: Path,
    torch_acc: dict,
    exports: dict,
    onnx: dict,
    gate: dict,
    step_seconds: dict,
    started: float,
) -> dict:
    """summary.json: every step's figures, as the demo's table shows them."""
    metrics = adapter_manifest.read(adapter_dir).metrics
    return {
        "task": "ISO date -> DD.MM.YYYY, held-out exact match",
        "eval_samples": torch_acc["total"],
        "accuracy": {
            "base": torch_acc["base"],
            "qlora_pytorch": torch_acc["qlora"],
            **{f"onnx_{p}": onnx[p]["correct"] / onnx[p]["total"] for p in PRECISIONS},
        },
        "onnx": {
            p: {
                "size_mb": round(export_size(exports[p]) / 1e6, 3),
                "ttft_s": onnx[p]["ttft_s"],
                "decode_tokens_per_s": onnx[p]["decode_tokens_per_s"],
                "parity": merged_parity(exports[p]),
            }
            for p in PRECISIONS
        },
        "training": {
            "steps": config.max_steps,
            "seconds_per_step": metrics["seconds_per_step"],
            "train_seconds": metrics["train_seconds"],
            "final_loss": metrics["train_loss"],
        },
        "latency_settings": {
            "prompt_tokens": LATENCY_SETTINGS.prompt_lens[0],
            "new_tokens": LATENCY_SETTINGS.new_tokens,
            "threads": "one per physical core",
        },
        "int4_vs_fp32": gate,
        "step_seconds": step_seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
    }


class Steps:
    """Numbers and times the steps; a failure names its step and keeps what earlier steps wrote."""

    def __init__(self, workdir: Path, console: Console):
        self.workdir, self.console, self.seconds, self.n = workdir, console, {}, 0

    def run(self, name: str, fn, *args):
        self.n += 1
        self.console.print(f"[bold]step {self.n}[/bold]: {name}")
        start = time.perf_counter()
        try:
            result = fn(*args)
        except UsageError:
            raise
        except Exception as e:
            raise DemoStepError(
                f"demo step {self.n} ({name}) failed: {type(e).__name__}: {e} — "
                f"earlier steps' outputs are kept in {self.workdir}"
            ) from e
        self.seconds[name] = round(time.perf_counter() - start, 2)
        return result


def build_base(workdir: Path) -> Path:
    from edge_lora.tiny import build_base_model

    return build_base_model(workdir / "base")


def train_adapter(config: TrainConfig) -> Path:
    from edge_lora.train.loop import train

    return train(config)


def torch_accuracy(base_dir: Path, adapter_dir: Path, eval_path: Path) -> dict:
    from edge_lora.eval import targets
    from edge_lora.eval.run import exact_match
    from edge_lora.train.data import read_jsonl
    from edge_lora.train.reference import qlora_model

    samples = [record for _, record in read_jsonl(eval_path)]
    model = qlora_model(adapter_dir, base_dir, adapter_manifest.read(adapter_dir))
    target = targets.TorchTarget(targets.spec(adapter_dir), model=model)
    qlora = exact_match(target, samples, MAX_NEW_TOKENS)
    with model.disable_adapter():  # the same 4-bit base without the adapter
        base = exact_match(target, samples, MAX_NEW_TOKENS)
    return {"base": base.value, "qlora": qlora.value, "total": len(samples)}


def export_adapter(adapter_dir: Path, out: Path, precision: str) -> Path:
    from edge_lora.export import ExportOptions, export

    return export(adapter_dir, out, ExportOptions(precision=precision), overwrite=True)


def runtime_check(export_dir: Path, eval_path: Path) -> dict:
    cmd = [sys.executable, "-m", "edge_lora.demo.runtime_check", str(export_dir), str(eval_path), str(MAX_NEW_TOKENS)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["heavy_modules_loaded"]:
        raise RuntimeError(f"the runtime imported {', '.join(result['heavy_modules_loaded'])}")
    return result


def regression_gate(old: dict, new: dict, eval_path: Path) -> dict:
    """`edge-lora eval compare` on the runtime checks' per-sample results: int4 fails if its exact match is more
    than GATE_POINTS below fp32's with McNemar's exact p < 0.05."""
    from edge_lora.eval.compare import ALPHA, pair
    from edge_lora.eval.run import SampleResult

    p = pair(
        str(eval_path),
        [SampleResult(**s) for s in old["samples"]],
        [SampleResult(**s) for s in new["samples"]],
        "exact",
        GATE_POINTS,
    )
    line = (
        f"int4 against fp32 on the same {p.old.samples} prompts: exact match {p.old.value:.1%} -> "
        f"{p.new.value:.1%} ({p.delta_points:+.1f} points, {p.new_better} better / {p.new_worse} worse, "
        f"McNemar exact p = {p.p_value:.2g}): {'FAILS' if p.worse_beyond_margin else 'passes'} the gate "
        f"(worse by > {GATE_POINTS:g} points with p < {ALPHA})"
    )
    return {"delta_points": p.delta_points, "p_value": p.p_value, "passed": not p.worse_beyond_margin, "line": line}


def export_size(export_dir: Path) -> int:
    """Bytes of the portable graph and its external data."""
    return sum(p.stat().st_size for p in export_dir.iterdir() if p.name.startswith(PORTABLE_GRAPH))


def merged_parity(export_dir: Path) -> dict:
    """The parity report of a merged export (its export.json)."""
    from edge_lora.runtime.package import open_export

    return open_export(export_dir, verify=False).manifest.parity["merged"]


def summary_table(summary: dict) -> Table:
    table = Table(title=f"edge-lora demo — {summary['task']} ({summary['eval_samples']} prompts)")
    for column in ("model", "accuracy", "size", "TTFT", "decode tok/s"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    acc = summary["accuracy"]
    table.add_row("base, NF4, PyTorch", f"{acc['base']:.1%}", "", "", "")
    table.add_row("QLoRA, NF4+LoRA, PyTorch", f"{acc['qlora_pytorch']:.1%}", "", "", "")
    for p, figures in summary["onnx"].items():
        table.add_row(
            f"ONNX {p}, runtime",
            f"{acc[f'onnx_{p}']:.1%}",
            f"{figures['size_mb']:.2f} MB",
            f"{figures['ttft_s'] * 1000:.2f} ms",
            f"{figures['decode_tokens_per_s']:.0f}",
        )
    t = summary["training"]
    lat = summary["latency_settings"]
    table.caption = (
        f"latency: prompt {lat['prompt_tokens']} tokens, {lat['new_tokens']} new tokens; training: "
        f"{t['steps']} steps, {t['seconds_per_step']:.3f} s/step, final loss {t['final_loss']:.4f}; "
        f"whole demo {summary['total_seconds']} s"
    )
    return table
