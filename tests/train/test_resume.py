"""Checkpoints and --resume: a run killed with SIGKILL and resumed ends bit-identical to one never stopped."""

import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here trains, is killed, and resumes

STEPS, SAVE_EVERY = 60, 5


def train_args(base_dir, train_path, output, *extra):
    return [
        sys.executable,
        "-m",
        "edge_lora",
        "train",
        "--model",
        str(base_dir),
        "--data",
        str(train_path),
        "--output",
        str(output),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--save-every",
        str(SAVE_EVERY),
        "--quiet",
        *map(str, extra),
    ]


def run(args):
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(base_dir, task_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "straight"
    done = run(train_args(base_dir, task_files[0], out))
    assert done.returncode == 0, done.stderr
    return out


def test_sigkill_then_resume_is_bit_identical(base_dir, task_files, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_args(base_dir, task_files[0], out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / f"step-{SAVE_EVERY:08d}"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))  # somewhere in the steps after the first checkpoint, maybe mid-write
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed; raise STEPS"
    assert not (out / "adapter_model.safetensors").exists()

    done = run(train_args(base_dir, task_files[0], out, "--resume"))
    assert done.returncode == 0, done.stderr
    resumed, straight = (
        load_file(out / "adapter_model.safetensors"),
        load_file(uninterrupted / "adapter_model.safetensors"),
    )
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert (resumed[name] == straight[name]).all(), name
    import json

    assert json.loads((out / "edge_lora.json").read_text())["metrics"]["resumed_from_step"] >= SAVE_EVERY
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # rows after the checkpoint were dropped, not duplicated


def test_checkpoints_are_complete_and_pruned(uninterrupted):
    names = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert names == [f"step-{STEPS - SAVE_EVERY:08d}", f"step-{STEPS:08d}"]  # keep_checkpoints=2
    assert (uninterrupted / "loss.png").stat().st_size > 0


def test_refusals_keep_what_was_written(base_dir, make_base, task_files, uninterrupted, tmp_path):
    before = (uninterrupted / "adapter_model.safetensors").read_bytes()
    done = run(train_args(base_dir, task_files[0], uninterrupted))
    assert done.returncode == 2 and "already holds a training run — pass --resume" in done.stderr
    done = run(train_args(base_dir, task_files[0], uninterrupted, "--resume", "--rank", "8"))
    assert done.returncode == 2 and "the config differs from the checkpoint's (lora:" in done.stderr
    other_base = make_base(tmp_path / "other", seed=1)
    done = run(train_args(other_base, task_files[0], uninterrupted, "--resume"))
    assert done.returncode == 2 and "was trained on another base model" in done.stderr
    done = run(train_args(base_dir, task_files[0], tmp_path / "fresh", "--resume"))
    assert done.returncode == 2 and "no complete checkpoint" in done.stderr
    assert (uninterrupted / "adapter_model.safetensors").read_bytes() == before
