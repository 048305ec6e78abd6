"""The same training under torchrun (2 processes, gloo on CPU), and with gradient accumulation: same adapter."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here trains (two ranks, and one process to match)

# Sums of the same fp32 terms in another order (all-reduce, micro-batches) differ in the last bits. In fp32:
# in bf16 (auto's choice on a CPU with bf16 instructions) splitting a batch rounds every activation differently
# (5e-3 apart after 8 steps here), which would hide a real difference.
ADAPTER_ATOL = 1e-5


def train(base_dir, train_path, output, *extra, launcher=()):
    args = [
        *launcher,
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
        "8",
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--compute-dtype",
        "float32",
        "--quiet",
        *extra,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(output / "adapter_model.safetensors")


def assert_close(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= ADAPTER_ATOL, worst


@pytest.fixture(scope="module")
def single(base_dir, task_files, tmp_path_factory):
    return train(base_dir, task_files[0], tmp_path_factory.mktemp("single") / "out")


def test_two_ranks_end_identical_and_match_one_process(base_dir, task_files, single, tmp_path):
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    ddp = train(base_dir, task_files[0], tmp_path / "ddp", launcher=torchrun)
    record = json.loads((tmp_path / "ddp" / "edge_lora.json").read_text())["distributed"]
    assert record["world_size"] == 2 and record["ranks_identical"]
    assert_close(ddp, single)


def test_accumulation_and_checkpointing_change_nothing(base_dir, task_files, single, tmp_path):
    assert_close(
        train(base_dir, task_files[0], tmp_path / "acc", "--grad-accum", "4", "--gradient-checkpointing"), single
    )
