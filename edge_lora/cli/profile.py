"""`edge-lora profile`: measure an export's latency across configurations, or compare reports."""

from __future__ import annotations

import sys

import click

from edge_lora.cli.common import DefaultGroup, csv_ints, csv_strings


@click.group("profile", cls=DefaultGroup, default="measure")
def profile() -> None:
    """Measure latency of an export (MLPerf single-stream style), or compare reports.

    \b
    Example:  edge-lora profile demo-out/export-int4 --threads 1,2 --prompt-lens 16,64 --new-tokens 32 --out prof
              edge-lora profile compare prof-a/profile.json prof-b/profile.json
    """


@profile.command("measure")
@click.argument("export_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--device", default=None, help="Device profile (providers, threads, bandwidth).")
@click.option(
    "--providers",
    default=None,
    help="Comma-separated execution providers to sweep, each on its own [default: the profile's list].",
)
@click.option("--threads", default="0", show_default=True, help="Comma-separated thread counts (0: the profile's).")
@click.option("--prompt-lens", default="128", show_default=True, help="Comma-separated prompt lengths in tokens.")
@click.option(
    "--adapters",
    default=None,
    help="Comma-separated adapters to sweep on an export of flavor adapters, each against no adapter "
    "[default: all of its adapters].",
)
@click.option(
    "--new-tokens", type=int, default=64, show_default=True, help="New tokens per run (end-of-sequence ignored)."
)
@click.option("--warmup-runs", type=int, default=2, show_default=True, help="Unrecorded runs per configuration first.")
@click.option("--min-runs", type=int, default=5, show_default=True)
@click.option("--min-seconds", type=float, default=2.0, show_default=True)
@click.option(
    "--trace",
    is_flag=True,
    help="Trace one more run per configuration with onnxruntime profiling; "
    "report the top operators and keep the traces in --out.",
)
@click.option(
    "--measure-bandwidth",
    is_flag=True,
    help="Set decode speed against this host's measured bandwidth, not the device profile's.",
)
@click.option(
    "--out",
    default="profile-out",
    show_default=True,
    help="Dir for profile.json, profile.csv, profile.md, the PNG plots and traces.",
)
def profile_measure(
    export_dirs: tuple[str, ...],
    device: str | None,
    providers: str | None,
    threads: str,
    prompt_lens: str,
    adapters: str | None,
    new_tokens: int,
    warmup_runs: int,
    min_runs: int,
    min_seconds: float,
    trace: bool,
    measure_bandwidth: bool,
    out: str,
) -> None:
    """Profile one or more exports (say one per precision) across adapters (on and off), providers, threads and
    prompt lengths, each configuration in a process of its own: warm-up, then runs until both --min-runs and
    --min-seconds are met. A provider this host lacks is reported as unavailable.

    \b
    Example:  edge-lora profile demo-out/export-fp32 demo-out/export-int4 --threads 1,2 --prompt-lens 16,64 \\
                  --new-tokens 32
              edge-lora profile my-export --providers CUDAExecutionProvider,CPUExecutionProvider --trace --out prof
              edge-lora profile shared-export --adapters my-adapter --threads 2 --out prof
    """
    from edge_lora.runtime.profile.report import PLOTS_SKIPPED, render_adapter_table, render_table, write_report
    from edge_lora.runtime.profile.sweep import ProfileSettings
    from edge_lora.runtime.profile.sweep import profile as run_profile

    settings = ProfileSettings(
        threads=csv_ints(threads, "--threads"),
        prompt_lens=csv_ints(prompt_lens, "--prompt-lens"),
        new_tokens=new_tokens,
        warmup_runs=warmup_runs,
        min_runs=min_runs,
        min_seconds=min_seconds,
        providers=csv_strings(providers) if providers else None,
        device=device,
        adapters=csv_strings(adapters),
        trace=trace,
        measure_bandwidth=measure_bandwidth,
    )
    report = run_profile(list(export_dirs), settings, trace_dir=out)
    paths = write_report(report, out)
    click.echo(render_table(report))
    if adapters_table := render_adapter_table(report):
        click.echo(f"Adapters against the base model (on ÷ off):\n\n{adapters_table}")
    click.echo(f"report: {', '.join(str(p) for p in paths.values())}")
    if "latency_cdf" not in paths:
        click.echo(PLOTS_SKIPPED)


@profile.command("compare")
@click.argument("reports", nargs=-1, required=True, type=click.Path())
@click.option(
    "--fail-if-slower",
    default=None,
    metavar="PERCENT",
    help="Exit 1 when a configuration's decode tok/s is lower, or e2e p50 higher, than the first "
    "report's by more than this, e.g. 10%.",
)
def profile_compare(reports: tuple[str, ...], fail_if_slower: str | None) -> None:
    """Ratio tables of profile reports against the first one, matched by precision, adapter, provider, threads
    and prompt length, and of each adapter against no adapter; with --fail-if-slower, a regression gate for CI
    (exit 1 on a regression). One report with adapters gives the adapter table alone.

    \b
    Example:  edge-lora profile compare base/profile.json new/profile.json --fail-if-slower 10%
              edge-lora profile compare prof/profile.json
    """
    from edge_lora.runtime.profile.compare import compare, load_report, parse_margin

    margin = None if fail_if_slower is None else parse_margin(fail_if_slower)
    table, regressions = compare([load_report(path) for path in reports], margin, names=list(reports))
    click.echo(table)
    if regressions:
        click.echo(f"{len(regressions)} regression(s) beyond {fail_if_slower}:")
        for regression in regressions:
            click.echo(f"  {regression}")
        sys.exit(1)  # not click's Exit: main() runs click non-standalone, which returns an Exit's code unused
