"""`edge-lora eval`: a metric with its confidence interval for an adapter or export, or a paired comparison of
two of them."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from edge_lora.cli.common import DefaultGroup


def eval_options(command: Callable) -> Callable:
    """The options `eval` and `eval compare` share."""
    from edge_lora.eval.metrics import METRICS

    options = [
        click.option(
            "--data",
            required=True,
            multiple=True,
            help="Eval JSONL (prompt/completion, messages, or text for perplexity); repeat for one row each.",
        ),
        click.option(
            "--metric",
            type=click.Choice(METRICS),
            default="exact",
            show_default=True,
            help="exact / contains (Wilson interval), token-f1 / perplexity (bootstrap interval).",
        ),
        click.option(
            "--max-new-tokens",
            type=click.IntRange(min=1),
            default=None,
            help="Greedy tokens per sample [default: the longest reference's tokens + 2].",
        ),
        click.option(
            "--base", default=None, help="Base model dir of an adapter target, if not where its manifest says."
        ),
        click.option("--device", default=None, help="Device profile of an export target (providers, threads)."),
        click.option("--threads", type=int, default=None, help="Intra-op threads of an export target."),
        click.option(
            "--out",
            default="eval-samples.jsonl",
            show_default=True,
            help="Per-sample results, one JSON object per sample (written here, never into a target or data dir).",
        ),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group("eval", cls=DefaultGroup, default="target")
def eval_group() -> None:
    """Evaluate an adapter dir (PyTorch: its 4-bit base with the adapter) or an export dir (the runtime) on eval
    files: the metric with a 95% confidence interval and the latency per sample, one row per --data file; or
    compare two targets on the same samples, a regression gate.

    \b
    Example:  edge-lora eval demo-out/export-int4 --data demo-out/data/eval.jsonl
              edge-lora eval my-adapter --data in_dist.jsonl --data ood.jsonl --metric token-f1 --out my-adapter.jsonl
              edge-lora eval compare demo-out/export-fp32 demo-out/export-int4 --data demo-out/data/eval.jsonl \\
                  --fail-if-worse 2
    """


@eval_group.command("target")
@click.argument("target", type=click.Path())
@click.option(
    "--adapter", default=None, help="Adapter to activate, for an export of flavor adapters (default: the base)."
)
@eval_options
def eval_target(
    target: str,
    adapter: str | None,
    data: tuple[str, ...],
    metric: str,
    max_new_tokens: int | None,
    base: str | None,
    device: str | None,
    threads: int | None,
    out: str,
    quiet: bool,
) -> None:
    """Evaluate one target (an adapter dir or an export dir) on one or more eval files.

    \b
    Example:  edge-lora eval demo-out/export-int4 --data demo-out/data/eval.jsonl --metric exact
    """
    from edge_lora.eval.report import eval_table, write_samples
    from edge_lora.eval.run import EvalSettings, evaluate

    settings = EvalSettings(metric=metric, max_new_tokens=max_new_tokens, base=base, device=device, threads=threads)
    report = evaluate(target, list(data), settings, adapter=adapter, show_progress=not quiet)
    click.echo(eval_table(report))
    click.echo(f"per-sample results: {write_samples([report], out)}")


@eval_group.command("compare")
@click.argument("old", type=click.Path())
@click.argument("new", type=click.Path())
@click.option("--old-adapter", default=None, help="Adapter of OLD, for an export of flavor adapters.")
@click.option("--new-adapter", default=None, help="Adapter of NEW, for an export of flavor adapters.")
@click.option(
    "--fail-if-worse",
    type=float,
    default=None,
    metavar="POINTS",
    help="Exit 1 when NEW is worse than OLD by more than POINTS (percentage points; perplexity units for "
    "perplexity) AND the paired test gives p < 0.05 (McNemar exact for exact/contains, sign test "
    "otherwise).",
)
@eval_options
def eval_compare(
    old: str,
    new: str,
    old_adapter: str | None,
    new_adapter: str | None,
    fail_if_worse: float | None,
    data: tuple[str, ...],
    metric: str,
    max_new_tokens: int | None,
    base: str | None,
    device: str | None,
    threads: int | None,
    out: str,
    quiet: bool,
) -> None:
    """Compare two adapter versions or two exports (say fp32 and int4) on the same samples, paired; with
    --fail-if-worse, a regression gate for CI (exit 1 on a regression). Both must share a tokenizer.

    \b
    Example:  edge-lora eval compare demo-out/export-fp32 demo-out/export-int4 --data demo-out/data/eval.jsonl \\
                  --fail-if-worse 2
              edge-lora eval compare adapter-v1 adapter-v2 --data eval.jsonl --metric token-f1 --fail-if-worse 1
    """
    from edge_lora.eval.compare import compare
    from edge_lora.eval.report import compare_table, write_samples
    from edge_lora.eval.run import EvalSettings

    settings = EvalSettings(metric=metric, max_new_tokens=max_new_tokens, base=base, device=device, threads=threads)
    comparison = compare(
        old,
        new,
        list(data),
        settings,
        margin=fail_if_worse,
        old_adapter=old_adapter,
        new_adapter=new_adapter,
        show_progress=not quiet,
    )
    click.echo(compare_table(comparison))
    click.echo(f"per-sample results: {write_samples([comparison.old, comparison.new], out)}")
    if comparison.failed:
        worse = [p.data for p in comparison.pairings if p.worse_beyond_margin]
        click.echo(
            f"NEW is worse than OLD beyond the margin of {fail_if_worse:g} (with p < 0.05) on {', '.join(worse)}"
        )
        sys.exit(1)  # not click's Exit: main() runs click non-standalone, which returns an Exit's code unused
