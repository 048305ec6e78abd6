"""The demo's task: rewrite an ISO date (2024-03-17) as day.month.year (17.03.2024).

A random-weight base cannot do it; LoRA adapters on a frozen 4-bit base learn it in a few hundred steps. The
held-out dates never occur in the training set.
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

FIRST_DAY = datetime.date(1900, 1, 1)
DAYS = 200 * 365  # dates from 1900 to 2099


def date_samples(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct {"prompt", "completion"} pairs whose ISO dates are not in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude)
    samples = []
    while len(samples) < n:
        day = FIRST_DAY + datetime.timedelta(days=rng.randrange(DAYS))
        iso = day.isoformat()
        if iso in seen:
            continue
        seen.add(iso)
        samples.append({"prompt": f"{iso} ->", "completion": day.strftime(" %d.%m.%Y")})
    return samples


def write_jsonl(samples: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def write_task(out_dir: Path, n_train: int = 4000, n_eval: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and a held-out eval.jsonl (no date shared with the training set)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train = date_samples(n_train, seed)
    held_out = date_samples(n_eval, seed + 1, exclude=frozenset(s["prompt"][:10] for s in train))
    return write_jsonl(train, out_dir / "train.jsonl"), write_jsonl(held_out, out_dir / "eval.jsonl")
