"""onnxruntime profiling traces summarised as the operators that took the most time.

A trace (SessionOptions.enable_profiling) is a Chrome-trace JSON list of events: one "Session" event named
"model_run" per session.run, and one "Node" event "<node name>_kernel_time" per node run, with its duration in
microseconds and its operator type in args.op_name.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

TOP_OPS = 10


def summarize_trace(path: str | Path, last_runs: int | None = None, top: int = TOP_OPS) -> dict:
    """The `top` operator types by total kernel time, over the last `last_runs` session runs (None: all of them).

    Keeping only the last runs leaves out warm-up runs traced by the same session.
    """
    events = json.loads(Path(path).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    kept_runs = runs if last_runs is None else runs[-last_runs:]
    start = kept_runs[0] if kept_runs else 0
    total_us: dict[str, int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= start:
            op = event["args"]["op_name"]
            total_us[op] += event["dur"]
            calls[op] += 1
    kernel_us = sum(total_us.values())
    ranked = sorted(total_us, key=lambda op: (-total_us[op], op))[:top]
    return {
        "file": str(Path(path).resolve()),
        "model_runs": len(kept_runs),
        "kernel_ms": kernel_us / 1e3,
        "top_ops": [
            {"op": op, "total_ms": total_us[op] / 1e3, "share": total_us[op] / kernel_us, "calls": calls[op]}
            for op in ranked
        ],
    }


def render_trace(trace: dict, title: str) -> str:
    """A Markdown table of one trace summary's top operators, under a heading."""
    lines = [
        f"### Top operators: {title}\n",
        f"{trace['model_runs']} session runs, {trace['kernel_ms']:.1f} ms in kernels; trace: {trace['file']}\n",
        "| operator | total (ms) | share | calls |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {o['op']} | {o['total_ms']:.2f} | {o['share']:.1%} | {o['calls']} |" for o in trace["top_ops"]]
    return "\n".join(lines) + "\n"
