"""Profile reports written to files: profile.json (everything), profile.csv (one row per configuration),
profile.md (the table, traces and plots) and PNG plots (matplotlib, the `plot` extra)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from edge_lora.formats import PROFILE_REPORT, ProfileReport
from edge_lora.runtime.profile.trace import render_trace

PLOTS_SKIPPED = "Plots not written: matplotlib is not installed — pip install 'edge-lora[plot]'"


def short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


def label(config: dict, with_prompt: bool = True) -> str:
    """A configuration in a few words: "fp32 CPU t2 p128", "fp32 +dates CPU t2 p128" with adapter "dates" active."""
    adapter = f" +{config['adapter']}" if config["adapter"] else ""
    text = f"{config['export']['precision']}{adapter} {short(config['provider'])} t{config['threads']}"
    return f"{text} p{config['prompt_len']}" if with_prompt else text


def adapter_pairs(report: ProfileReport) -> list[tuple[dict, dict]]:
    """(adapter off, adapter on) for every measured configuration with an adapter active whose counterpart without
    one (same export, provider, threads and prompt length) was measured too."""

    def key(c: dict) -> tuple:
        return c["export"]["path"], c["provider"], c["threads"], c["prompt_len"]

    base = {key(c): c for c in report.configurations if c["adapter"] is None and c["status"] == "ok"}
    return [
        (base[key(c)], c)
        for c in report.configurations
        if c["adapter"] is not None and c["status"] == "ok" and key(c) in base
    ]


def render_adapter_table(report: ProfileReport) -> str:
    """A Markdown table of each adapter-on configuration against the same one with no adapter (the base model):
    decode tokens/s, TTFT p50 and e2e p50 as ratios on ÷ off. Empty when the report has no such pairs."""
    header = [
        "export",
        "adapter",
        "provider",
        "threads",
        "prompt",
        "decode tok/s off",
        "decode tok/s on",
        "decode ×",
        "TTFT ×",
        "e2e ×",
        "bytes/token ×",
    ]
    rows = []
    for off, on in adapter_pairs(report):
        a, b = off["summary"], on["summary"]
        rows.append(
            [
                off["export"]["precision"],
                on["adapter"],
                short(on["provider"]),
                str(on["threads"]),
                str(on["prompt_len"]),
                f"{a['decode_tokens_s']:.1f}",
                f"{b['decode_tokens_s']:.1f}",
                f"{b['decode_tokens_s'] / a['decode_tokens_s']:.2f}",
                f"{b['ttft_p50_s'] / a['ttft_p50_s']:.2f}",
                f"{b['e2e_p50_s'] / a['e2e_p50_s']:.2f}",
                "—"
                if None in (a["bytes_per_token"], b["bytes_per_token"])
                else f"{b['bytes_per_token'] / a['bytes_per_token']:.2f}",
            ]
        )
    return markdown_table(header, rows) if rows else ""


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table whose first three columns (export, adapter, provider) are text, left-aligned, and whose
    others are figures, right-aligned."""
    lines = [header, ["---"] * 3 + ["---:"] * (len(header) - 3), *rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


# Columns of the Markdown table: its header, and the cell of one measured configuration (its summary as `s`).
KEY_COLUMNS = (
    ("export", lambda c: c["export"]["precision"]),
    ("adapter", lambda c: c["adapter"] or "—"),
    ("provider", lambda c: short(c["provider"])),
    ("threads", lambda c: f"{c['threads']}"),
    ("prompt", lambda c: f"{c['prompt_len']}"),
)
FIGURE_COLUMNS = (
    ("TTFT p50 (ms)", lambda s: f"{s['ttft_p50_s'] * 1e3:.1f}"),
    ("decode tok/s", lambda s: f"{s['decode_tokens_s']:.1f}"),
    (
        "e2e p50 (ms) [95% CI]",
        lambda s: (
            f"{s['e2e_p50_s'] * 1e3:.1f}"
            + (" [{:.1f}, {:.1f}]".format(*(t * 1e3 for t in s["e2e_p50_ci95_s"])) if s["e2e_p50_ci95_s"] else "")
        ),
    ),
    ("e2e p99 (ms)", lambda s: f"{s['e2e_p99_s'] * 1e3:.1f}"),
    ("peak RSS (MB)", lambda s: f"{s['peak_rss_mb']:.0f}"),
    (
        "of bandwidth bound",
        lambda s: "—" if s["decode_fraction_of_bound"] is None else f"{s['decode_fraction_of_bound']:.1%}",
    ),
)


def render_table(report: ProfileReport) -> str:
    """One Markdown table row per configuration; an unavailable one says so in place of its figures."""
    rows = []
    for c in report.configurations:
        keys = [cell(c) for _, cell in KEY_COLUMNS]
        if c["status"] == "ok":
            rows.append(keys + [cell(c["summary"]) for _, cell in FIGURE_COLUMNS])
        else:
            rows.append(keys + [c["status"]] + ["—"] * (len(FIGURE_COLUMNS) - 1))
    return markdown_table([header for header, _ in KEY_COLUMNS + FIGURE_COLUMNS], rows)


# Flat columns of profile.csv: the configuration's keys, then every scalar of its summary (empty when unavailable).
CSV_KEYS = (
    "status",
    "reason",
    "export_path",
    "precision",
    "export_digest",
    "adapter",
    "provider",
    "session_providers",
    "threads",
    "prompt_len",
    "new_tokens",
)
CSV_FIGURES = (
    "runs",
    "load_s",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "prefill_tokens_s",
    "decode_tokens_s",
    "e2e_p50_s",
    "e2e_p90_s",
    "e2e_p99_s",
    *(f"e2e_p{p}_ci95_{end}_s" for p in (50, 90, 99) for end in ("low", "high")),
    "e2e_mean_s",
    "e2e_mean_ci95_low_s",
    "e2e_mean_ci95_high_s",
    "rss_before_load_mb",
    "peak_rss_mb",
    "model_bytes",
    "weight_bytes_per_token",
    "adapter_bytes_per_token",
    "kv_cache_bytes_per_token",
    "bytes_per_token",
    "bandwidth_gbs",
    "bandwidth_source",
    "bound_tokens_s",
    "decode_fraction_of_bound",
    "trace_file",
)
CSV_COLUMNS = CSV_KEYS + CSV_FIGURES


def csv_row(config: dict) -> dict:
    row = {
        "status": config["status"],
        "reason": config["reason"] or "",
        "export_path": config["export"]["path"],
        "precision": config["export"]["precision"],
        "export_digest": config["export"]["digest"],
        "adapter": config["adapter"] or "",
        "provider": config["provider"],
        "session_providers": ";".join(config["session_providers"]),
        "threads": config["threads"],
        "prompt_len": config["prompt_len"],
        "new_tokens": config["new_tokens"],
    }
    summary = config["summary"]
    if summary is None:
        return row | dict.fromkeys(CSV_FIGURES, "")
    figures = {key: summary[key] for key in CSV_FIGURES if key in summary}
    for name in ("e2e_p50", "e2e_p90", "e2e_p99", "e2e_mean"):  # an interval too few runs cannot give is left empty
        low, high = summary[f"{name}_ci95_s"] or ("", "")
        figures |= {f"{name}_ci95_low_s": low, f"{name}_ci95_high_s": high}
    trace_file = config["trace"]["file"] if config["trace"] else ""
    return row | figures | {"trace_file": trace_file}


def write_report(report: ProfileReport, out_dir: str | Path) -> dict[str, Path]:
    """Write profile.json, profile.csv, profile.md and, where matplotlib imports, the PNG plots into out_dir;
    the paths written, by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / PROFILE_REPORT, "csv": out_dir / "profile.csv", "markdown": out_dir / "profile.md"}
    report.save(paths["json"])
    with paths["csv"].open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_row(c) for c in report.configurations)
    try:
        plots = write_plots(report, out_dir)
    except ImportError:
        plots = {}
    paths["markdown"].write_text(render_markdown(report, plots))
    return paths | plots


def render_markdown(report: ProfileReport, plots: dict[str, Path]) -> str:
    host, settings = report.host, report.settings

    def graph(g: dict) -> str:
        per_token = "unknown" if g["weight_bytes_per_token"] is None else f"{g['weight_bytes_per_token']:,}"
        return (
            f"{g['model_file']} {g['model_bytes']:,} model bytes, {per_token} weight bytes "
            f"read per token{''.join(f', adapter {n} {b:,} bytes' for n, b in g['adapter_bytes'].items())}"
        )

    exports = "".join(
        f"- {e['precision']} {e['flavor']} export {e['digest'][:12]}: {graph(e)}"
        f"{''.join(f'; for {k}: {graph(g)}' for k, g in e['kernel_graphs'].items())} ({e['path']})\n"
        for e in report.exports
    )
    parts = [
        f"# Profile of {len(report.exports)} export(s)\n\n{exports}\n"
        f"{settings['new_tokens']} new tokens per run, device profile {report.device_profile['name']}, "
        f"on {host['cpu_model']} ({host['physical_cores']} cores), onnxruntime {host['onnxruntime']}, "
        f"{report.created}.\n",
        render_table(report),
    ]
    adapters = render_adapter_table(report)
    if adapters:
        parts.append(
            "## Adapters against the base model\n\nEach adapter-on configuration ÷ the same one with no "
            "adapter: decode above 1 is faster, TTFT and e2e below 1 are faster.\n\n" + adapters
        )
    measured = [c for c in report.configurations if c["status"] == "ok"]
    if measured:
        parts.append(
            "Peak RSS is each configuration's own: it is measured in a fresh process per configuration "
            "(Python and onnxruntime included; their share before the model loads is rss_before_load_mb "
            "in profile.json).\n"
        )
        sources = dict.fromkeys((c["summary"]["bandwidth_gbs"], c["summary"]["bandwidth_source"]) for c in measured)
        parts += [f"Bandwidth bound from {gbs:.1f} GB/s ({source}).\n" for gbs, source in sources]
    reasons = dict.fromkeys(c["reason"] for c in report.configurations if c["status"] != "ok")
    parts += [f"Unavailable: {reason}\n" for reason in reasons]
    parts += [render_trace(c["trace"], label(c)) for c in measured if c["trace"]]
    if plots:
        parts += [f"![{name}]({path.name})\n" for name, path in plots.items()]
    else:
        parts.append(PLOTS_SKIPPED + "\n")
    return "\n".join(parts)


def write_plots(report: ProfileReport, out_dir: Path) -> dict[str, Path]:
    """latency_cdf.png (end-to-end latency CDF per configuration) and decode_vs_prompt.png (decode tokens/s against
    prompt length, one line per export × adapter × provider × threads). ImportError without matplotlib."""
    from matplotlib.figure import Figure  # the `plot` extra; Figure draws with Agg, no pyplot state or GUI

    measured = [c for c in report.configurations if c["status"] == "ok"]
    paths = {"latency_cdf": out_dir / "latency_cdf.png", "decode_vs_prompt": out_dir / "decode_vs_prompt.png"}

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for c in measured:
        e2e_ms = np.sort([s["e2e_s"] for s in c["samples"]]) * 1e3
        axes.step(e2e_ms, np.arange(1, len(e2e_ms) + 1) / len(e2e_ms), where="post", label=label(c))
    axes.set(xlabel="end-to-end latency (ms)", ylabel="fraction of runs", title="Latency CDF", ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    if measured:
        axes.legend(fontsize="small")
    figure.savefig(paths["latency_cdf"], dpi=100)

    lines: dict[tuple, list[dict]] = defaultdict(list)
    for c in measured:
        lines[(c["export"]["path"], c["adapter"], c["provider"], c["threads"])].append(c)
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for configs in lines.values():
        configs.sort(key=lambda c: c["prompt_len"])
        axes.plot(
            [c["prompt_len"] for c in configs],
            [c["summary"]["decode_tokens_s"] for c in configs],
            marker="o",
            label=label(configs[0], with_prompt=False),
        )
    axes.set(xlabel="prompt length (tokens)", ylabel="decode tokens/s", title="Decode speed against prompt length")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    if measured:
        axes.legend(fontsize="small")
    figure.savefig(paths["decode_vs_prompt"], dpi=100)
    return paths
