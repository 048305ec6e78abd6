"""`edge-lora export`: an adapter (or several) to an ONNX export dir, checked for parity."""

from __future__ import annotations

from typing import get_args

import click

from edge_lora.formats import FLAVORS, GRAPHS, PRECISIONS, Graph
from edge_lora.train.config import ComputeDtype
from edge_lora.train.manifest import TRAINED_ON


@click.command("export")
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--output", required=True, help="Export dir to write (built in a temporary dir, then renamed).")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Weight precision [default: fp32, or the device profile's].",
)
@click.option(
    "--flavor",
    type=click.Choice(FLAVORS),
    default=None,
    help="Merge one adapter into the base, or keep several apart beside one base graph [default: merged].",
)
@click.option(
    "--merge-into",
    type=click.Choice(["dequantized", "original"]),
    default="dequantized",
    show_default=True,
    help="Merge onto the dequantized 4-bit weights the adapter was trained against, or the original ones.",
)
@click.option("--device", default=None, help="Device profile (see 'edge-lora devices list') for precision and opset.")
@click.option(
    "--int4-block-size",
    type=click.Choice(["16", "32", "64", "128"]),
    default=None,
    help="Weights per int4 scale [default: 32, or the device profile's].",
)
@click.option(
    "--int4-accuracy-level",
    type=click.IntRange(0, 4),
    default=None,
    help="MatMulNBits accuracy_level: 4 = int8 activations [default: 4, or the device profile's].",
)
@click.option(
    "--int4-head/--no-int4-head",
    default=True,
    show_default=True,
    help="Quantize the output head (and a tied embedding's MatMul) to int4 too.",
)
@click.option(
    "--graph",
    # "optimum" too, so that ExportOptions answers it with one line: optimum-onnx is gone, --graph torch replaces it.
    type=click.Choice(get_args(Graph)),
    metavar=f"[{'|'.join(GRAPHS)}]",
    default=None,
    help="Graph writer: torch's ONNX exporter, onnxruntime-genai's model builder (fused attention, "
    "Llama-family, fp32 or int4), or auto (the builder where it applies). Default: the "
    "--device profile's, else auto.",
)
@click.option(
    "--base",
    default=None,
    help="Base model dir, if not where the adapter's manifest (or a PEFT adapter's adapter_config.json) says.",
)
@click.option(
    "--trained-on",
    type=click.Choice(TRAINED_ON),
    default=None,
    help="For a PEFT adapter dir without edge_lora.json (PEFT, TRL, Unsloth, axolotl): how its base was held in "
    "training — nf4/fp4 for QLoRA (4-bit base), else the dtype a full-precision LoRA trained in.",
)
@click.option(
    "--double-quant/--no-double-quant",
    default=True,
    show_default=True,
    help="With --trained-on nf4/fp4: whether training quantized the 4-bit block scales too.",
)
@click.option(
    "--compute-dtype",
    type=click.Choice(get_args(ComputeDtype)),
    default="auto",
    show_default=True,
    help="With --trained-on nf4/fp4: the 4-bit layers' compute dtype in training (recorded).",
)
@click.option("--force", is_flag=True, help="Export even if --base's fingerprint differs from the adapter's base.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output once the new export is complete.")
@click.option("--no-validate", is_flag=True, help="Skip the parity gate (not recommended).")
@click.option(
    "--no-kernels",
    is_flag=True,
    help="Write the portable graph alone, without the graphs for edge-lora's own kernels (the profile's: "
    "matmul_q4, lora_add).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(
    adapter_dirs: tuple[str, ...],
    output: str,
    precision: str | None,
    flavor: str | None,
    merge_into: str,
    device: str | None,
    int4_block_size: str | None,
    int4_accuracy_level: int | None,
    int4_head: bool,
    graph: str | None,
    base: str | None,
    trained_on: str | None,
    double_quant: bool,
    compute_dtype: str,
    force: bool,
    overwrite: bool,
    no_validate: bool,
    no_kernels: bool,
    quiet: bool,
) -> None:
    """Merge an adapter (or keep several apart), export ONNX with KV cache, quantize, and check parity with
    the trained model.

    \b
    Example:  edge-lora export my-adapter --output my-export --precision int4
              edge-lora export adapter-a adapter-b --flavor adapters --output shared-export
              edge-lora export my-adapter --output laptop-export --device cpu-x86-64
              edge-lora export peft-qlora-adapter --trained-on nf4 --output my-export
    """
    options = {
        "merge_into": merge_into,
        "validate": not no_validate,
        "int4_head": int4_head,
        "trained_on": trained_on,
        "double_quant": double_quant,
        "compute_dtype": compute_dtype,
    }
    if no_kernels:
        options["kernels"] = ()
    if device:
        options |= profile_options(device)
    given = {
        "precision": precision,
        "flavor": flavor,
        "int4_accuracy_level": int4_accuracy_level,
        "graph": graph,
        "int4_block_size": int(int4_block_size) if int4_block_size else None,
    }
    options |= {k: v for k, v in given.items() if v is not None}

    from edge_lora.export import ExportOptions
    from edge_lora.export import export as run_export
    from edge_lora.runtime.package import open_export

    out = run_export(
        list(adapter_dirs),
        output,
        ExportOptions(**options),
        base=base,
        force=force,
        overwrite=overwrite,
        show_progress=not quiet,
    )
    manifest = open_export(out, verify=False).manifest
    click.echo(
        f"export written to {out} ({manifest.flavor}, {manifest.precision}); parity {parity_verdict(manifest.parity)}"
    )


def profile_options(device: str) -> dict:
    """The ExportOptions fields the device profile `device` sets."""
    from edge_lora import devices

    profile = devices.load(device)
    return {
        "precision": profile.precision,
        "flavor": profile.flavor,
        "opset": profile.opset,
        "graph": profile.graph,
        "device": profile.name,
        "int4_block_size": profile.int4_block_size,
        "int4_accuracy_level": profile.int4_accuracy_level,
    }


def parity_verdict(parity: dict | None) -> str:
    """export.json's parity reports in one line."""
    if not parity:
        return "parity not checked (--no-validate)"
    return "; ".join(
        f"{name}: max |Δlogit| {p['max_abs_logit_diff']:.2e}, greedy agreement {p['greedy_agreement']:.1%}"
        for name, p in parity.items()
    )
