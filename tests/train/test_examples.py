"""Each example config starts with the exact command that uses it; this runs that command."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_command_runs(example, tmp_path):
    from edge_lora.demo.task import write_task
    from edge_lora.tiny import build_base_model

    first = example.read_text().splitlines()[0]
    assert first.startswith("# edge-lora "), f"{example.name} must start with the command that uses it"
    command = shlex.split(first.removeprefix("# "))
    # the demo's outputs that the examples read, laid out as `edge-lora demo --workdir demo-out` lays them out
    build_base_model(tmp_path / "demo-out" / "base")
    write_task(tmp_path / "demo-out" / "data")
    shutil_example = tmp_path / "examples" / example.name
    shutil_example.parent.mkdir()
    shutil_example.write_text(example.read_text())
    done = subprocess.run(
        [sys.executable, "-m", "edge_lora", *command[1:], "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "demo-out" / "adapter-from-config" / "edge_lora.json").read_text())
    # learned, not just ran: a random base starts near ln(128) ≈ 4.9
    assert manifest["training"]["max_steps"] == 150 and manifest["metrics"]["eval_loss"] < 0.5
