"""Profile reports side by side: ratios against the first report, and a regression gate a CI job can use.

Configurations are matched by (precision, adapter, provider, threads, prompt length): the same shape measured by
another run, on another device or with another build. Within a report, each adapter-on configuration is also set
against the same one with no adapter. Speed is shown as a ratio against an anchor: a figure alone depends on the
machine and its load as much as on the change under test.
"""

from __future__ import annotations

import re
from pathlib import Path

from edge_lora.formats import ProfileError, ProfileReport
from edge_lora.runtime.profile.report import adapter_pairs, markdown_table, render_adapter_table, short

PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)%")


def load_report(path: str | Path) -> ProfileReport:
    """A profile.json written by `edge-lora profile`, checked to be a report of this schema version."""
    return ProfileReport.load(path)


def parse_margin(text: str, option: str = "--fail-if-slower") -> float:
    """A percentage such as "10%" as the fraction 0.10."""
    match = PERCENT.fullmatch(text.strip())
    if not match:
        raise ProfileError(f"{option} {text!r} is not a percentage — write a number followed by %, for example 10%")
    return float(match.group(1)) / 100


def _key(config: dict) -> tuple:
    return (
        config["export"]["precision"],
        config["adapter"],
        config["provider"],
        config["threads"],
        config["prompt_len"],
    )


def _show(key: tuple) -> str:
    precision, adapter, provider, threads, prompt_len = key
    adapter = f" +{adapter}" if adapter else ""
    return f"{precision}{adapter} {short(provider)} threads {threads} prompt {prompt_len}"


def _index(report: ProfileReport, name: str) -> dict[tuple, dict]:
    configs: dict[tuple, dict] = {}
    for config in report.configurations:
        key = _key(config)
        if key in configs:
            raise ProfileError(
                f"{name} has two configurations of {_show(key)} — compare reports whose exports "
                "differ in precision, or profile them one per report"
            )
        configs[key] = config
    return configs


def _ratios(base: dict, later: dict) -> tuple[float, float, float]:
    """later ÷ base of decode tokens/s, TTFT p50 and e2e p50."""
    b, s = base["summary"], later["summary"]
    return (
        s["decode_tokens_s"] / b["decode_tokens_s"],
        s["ttft_p50_s"] / b["ttft_p50_s"],
        s["e2e_p50_s"] / b["e2e_p50_s"],
    )


def compare(
    reports: list[ProfileReport], fail_if_slower: float | None = None, names: list[str] | None = None
) -> tuple[str, list[str]]:
    """A Markdown ratio table of every later report against the first, then for each report with adapters a table
    of adapter on ÷ off; and the regressions beyond the margin.

    A regression is a configuration measured in both whose decode tokens/s is lower, or whose e2e p50 is higher,
    than the first report's by more than the fraction `fail_if_slower` (None: no gate, no regressions). One report
    alone is compared only with itself, adapter on against off.
    """
    names = names or [f"#{i + 1}" for i in range(len(reports))]
    _check_inputs(reports, names, fail_if_slower)
    base, *later = [_index(report, name) for report, name in zip(reports, names)]
    adapter_tables = "".join(
        f"\nAdapters against the base model in {name} (on ÷ off: decode above 1 is faster, TTFT "
        f"and e2e below 1 are faster):\n\n{table}"
        for report, name in zip(reports, names)
        if (table := render_adapter_table(report))
    )
    if not later:
        return adapter_tables.lstrip("\n"), []
    header = [
        "export",
        "adapter",
        "provider",
        "threads",
        "prompt",
        f"decode tok/s ({names[0]})",
        f"TTFT p50 ms ({names[0]})",
        f"e2e p50 ms ({names[0]})",
    ]
    for name in names[1:]:
        header += [f"decode × ({name})", f"TTFT × ({name})", f"e2e × ({name})"]
    rows, regressions = [], []
    for key, config in base.items():
        row = _base_cells(key, config)
        for name, configs in zip(names[1:], later):
            cells, found = _against(name, key, config, configs.get(key), fail_if_slower)
            row += cells
            regressions += found
        rows.append(row)
    notes = [f"\nRatios are each report ÷ {names[0]}: decode above 1 is faster, TTFT and e2e below 1 are faster.\n"]
    for name, configs in zip(names[1:], later):
        extra = [_show(key) for key in configs if key not in base]
        if extra:
            notes.append(f"Only in {name}, not compared: {'; '.join(extra)}.\n")
    return markdown_table(header, rows) + "".join(notes) + adapter_tables, regressions


def _check_inputs(reports: list[ProfileReport], names: list[str], fail_if_slower: float | None) -> None:
    """Raise ProfileError unless there is something to compare, one name per report and a margin >= 0."""
    if not reports or (len(reports) == 1 and not adapter_pairs(reports[0])):
        raise ProfileError(
            f"compare needs two or more reports, or one with adapter-on and adapter-off "
            f"configurations, got {len(reports)} report(s) — pass a baseline and the runs to set "
            "against it"
        )
    if len(names) != len(reports):
        raise ProfileError(f"{len(names)} names for {len(reports)} reports — give one name per report")
    if fail_if_slower is not None and not fail_if_slower >= 0:
        raise ProfileError(f"fail_if_slower={fail_if_slower} must be a fraction >= 0, for example 0.10 for 10%")


def _base_cells(key: tuple, config: dict) -> list[str]:
    """The first report's cells of one configuration: its key, and its figures or its status."""
    precision, adapter, provider, threads, prompt_len = key
    cells = [precision, adapter or "—", short(provider), str(threads), str(prompt_len)]
    if config["status"] != "ok":
        return cells + [config["status"], "—", "—"]
    s = config["summary"]
    return cells + [f"{s['decode_tokens_s']:.1f}", f"{s['ttft_p50_s'] * 1e3:.1f}", f"{s['e2e_p50_s'] * 1e3:.1f}"]


def _against(
    name: str, key: tuple, config: dict, other: dict | None, fail_if_slower: float | None
) -> tuple[list[str], list[str]]:
    """The ratio cells of report `name`'s configuration `other` against the first report's `config`, and its
    regressions beyond the margin."""
    if other is None or config["status"] != "ok" or other["status"] != "ok":
        return ["missing" if other is None else "unavailable", "—", "—"], []
    decode, ttft, e2e = _ratios(config, other)
    cells = [f"{decode:.2f}", f"{ttft:.2f}", f"{e2e:.2f}"]
    if fail_if_slower is None:
        return cells, []
    b, s, margin = config["summary"], other["summary"], f"(margin {fail_if_slower:.0%})"
    regressions = []
    if decode < 1 - fail_if_slower:
        regressions.append(
            f"{name}: {_show(key)}: decode {b['decode_tokens_s']:.1f} → {s['decode_tokens_s']:.1f} "
            f"tok/s, {1 - decode:.0%} lower {margin}"
        )
    if e2e > 1 + fail_if_slower:
        regressions.append(
            f"{name}: {_show(key)}: e2e p50 {b['e2e_p50_s'] * 1e3:.1f} → {s['e2e_p50_s'] * 1e3:.1f} "
            f"ms, {e2e - 1:.0%} higher {margin}"
        )
    return cells, regressions
