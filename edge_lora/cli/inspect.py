"""`edge-lora inspect`: the lineage of an export or adapter dir."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the lineage tree as JSON.")
@click.option(
    "--verify-base", is_flag=True, help="Also recompute the base model's fingerprint (reads all its weights)."
)
def inspect_command(path: str, as_json: bool, verify_base: bool) -> None:
    """Print the lineage of an export dir or an adapter dir — export, adapter(s), base model, training and eval
    data — each parent still on disk checked against its recorded digest (matches, changed, missing).

    \b
    Example:  edge-lora inspect demo-out/export-int4
              edge-lora inspect demo-out/adapter --json
    """
    from edge_lora.lineage import inspect, render

    tree = inspect(path, verify_base=verify_base)
    click.echo(json.dumps(tree, indent=2) if as_json else render(tree))
