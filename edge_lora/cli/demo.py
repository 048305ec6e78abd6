"""`edge-lora demo`: the whole job on a tiny model, offline."""

from __future__ import annotations

import click


@click.command("demo")
@click.option(
    "--workdir",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo writes its model, data, adapter, exports and summary.json.",
)
def demo(workdir: str) -> None:
    """Run the whole job offline on a tiny model: build a random-weight Llama, QLoRA-train it on a
    date-reformatting task, export ONNX fp32 and int4, run both on the torch-free runtime, print one table.

    \b
    Example:  edge-lora demo --workdir demo-out
    """
    from edge_lora.demo.run import run_demo

    run_demo(workdir)
