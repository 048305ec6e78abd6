"""Training checkpoints: written to a temporary name, fsynced, renamed — so a checkpoint dir either is
complete or does not exist, whenever the process dies."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINTS = "checkpoints"
STATE = "state.pt"
META = "meta.json"
NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(output: Path, step: int, state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint `step` (a torch-saved `state` and a JSON `meta`), then drop all but the newest `keep`."""
    import torch

    final = checkpoint_dir(output, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / STATE)
    (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
    for f in (tmp / STATE, tmp / META, tmp):
        _fsync(f)
    if final.exists():  # a resumed run that reaches a step it had saved before writes the same state again
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    for old in complete(output)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def complete(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first; temporary dirs of a process that died are not among them."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and NAME.match(p.name))


def newest(output: Path) -> Path | None:
    found = complete(output)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict, dict]:
    import torch

    # weights_only: the state holds tensors, numbers and plain containers only; never unpickle arbitrary objects
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    return state, json.loads((path / META).read_text())


def remove_partial(output: Path) -> None:
    """Delete temporary checkpoint dirs left by a process that was killed while writing one."""
    root = output / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)
