"""Training checkpoints: written to a temporary name, fsynced, renamed — so a checkpoint dir either is
complete or does not exist, whenever the process dies. A resumed run must match the checkpoint's base and
settings."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from edge_lora.errors import UsageError
from edge_lora.formats import ADAPTER_MANIFEST
from edge_lora.train.config import TrainConfig

CHECKPOINTS = "checkpoints"
STATE = "state.pt"
META = "meta.json"
NAME = re.compile(r"^step-(\d{8})$")
# Fields a resumed run may change: they steer logging and checkpointing, not what is computed.
RESUME_FREE_FIELDS = {"output", "save_every", "keep_checkpoints", "log_every", "allow_overlap"}


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
    """The torch state and the meta of the checkpoint at `path`."""
    import torch

    # weights_only: the state holds tensors, numbers and plain containers only; never unpickle arbitrary objects
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    return state, read_meta(path)


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def remove_partial(output: Path) -> None:
    """Delete temporary checkpoint dirs left by a process that was killed while writing one."""
    root = output / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def to_resume(output: Path, resume: bool, config: TrainConfig, fingerprint: dict) -> Path | None:
    """The checkpoint a run continues from, None for a fresh run. With `resume`, the newest complete checkpoint in
    `output`, made from the same base (`fingerprint`) and settings; without, `output` must hold no run yet."""
    if not resume:
        if complete(output) or (output / ADAPTER_MANIFEST).exists():
            raise UsageError(
                f"output {output} already holds a training run — pass --resume to continue it, "
                "or choose another --output"
            )
        return None
    path = newest(output)
    if path is None:
        raise UsageError(f"--resume: no complete checkpoint in {output / CHECKPOINTS} — run without --resume to start")
    check_resumable(read_meta(path), config, fingerprint, output)
    return path


def check_resumable(meta: dict, config: TrainConfig, fingerprint: dict, where: Path) -> None:
    """UsageError unless a checkpoint's `meta` has the base of `fingerprint` and the settings of `config` (but
    RESUME_FREE_FIELDS)."""
    if meta["base_fingerprint"] != fingerprint["digest"]:
        raise UsageError(
            f"--resume: {where} was trained on another base model (fingerprint {meta['base_fingerprint'][:12]}… vs "
            f"{fingerprint['digest'][:12]}…) — pass the same --model, or a new --output to start over"
        )
    before, now = with_defaults(meta["config"], config), config.to_dict()
    changed = sorted(k for k in now if k not in RESUME_FREE_FIELDS and json.dumps(now[k]) != json.dumps(before.get(k)))
    if changed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise UsageError(
            f"--resume: the config differs from the checkpoint's ({diffs}) — use the same settings, or a new --output"
        )


def with_defaults(saved: dict, config: TrainConfig) -> dict:
    """A checkpoint's config with the defaults of fields added to TrainConfig since it was written (in force then)."""
    defaults = TrainConfig(model=config.model, data=config.data).to_dict()
    merged = defaults | saved
    for key in ("quant", "lora"):
        merged[key] = defaults[key] | saved.get(key, {})
    return merged
