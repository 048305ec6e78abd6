"""A training run's metrics: metrics.jsonl, a row every `log_every` steps, and loss.png drawn from it."""

from __future__ import annotations

import json
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class MetricsLog:
    """Appends rows to metrics.jsonl: loss, learning rate, gradient norm, loss tokens per second since the last
    row, and memory."""

    def __init__(self, path: Path):
        self.path = path
        self.tokens, self.since = 0, time.perf_counter()

    def count(self, loss_tokens: int) -> None:
        """Add a step's loss tokens to those of the next row."""
        self.tokens += loss_tokens

    def write(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        import torch

        now = time.perf_counter()
        row = {
            "step": step,
            "loss": round(loss, 6),
            "lr": lr,
            "grad_norm": round(grad_norm, 6),
            "loss_tokens_per_s": round(self.tokens / (now - self.since), 1),
            "rss_mb": round(rss_mb(), 1),
        }
        if torch.cuda.is_available():
            row["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tokens, self.since = 0, now


def keep_rows_until(path: Path, step: int) -> None:
    """Drop the rows after `step` (those a resumed run writes again); create the file if there is none."""
    rows = path.read_text().splitlines() if path.exists() else []
    path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def plot_loss(metrics_path: Path, png: Path) -> None:
    """loss.png: training loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="edge-lora training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
