""".ci/drift.py: the lock it writes, and the releases it names when a command fails under newer ones."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

DRIFT = Path(__file__).parent.parent / ".ci" / "drift.py"


def drift(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIFT), *args], capture_output=True, text=True)


def test_the_written_lock_pins_what_is_installed_without_local_labels_or_the_project(tmp_path):
    lock = tmp_path / "requirements.lock"
    assert drift(str(lock), "--write").returncode == 0
    pins = dict(line.split("==") for line in lock.read_text().splitlines() if line and not line.startswith("#"))
    assert pins["numpy"] == metadata.version("numpy")
    assert pins["torch"] == metadata.version("torch").split("+")[0]
    assert "edge-lora" not in pins and all("+" not in v for v in pins.values())
    # the lock just written names no difference
    done = drift(str(lock), "--", sys.executable, "-c", "pass")
    assert done.returncode == 0 and "differ from" in done.stdout and ": none" in done.stdout


def test_a_failing_command_names_the_releases_that_differ_from_the_lock(tmp_path):
    lock = tmp_path / "requirements.lock"
    numpy = metadata.version("numpy")
    lock.write_text("# an older lock\nnumpy==0.0.1\n")
    done = drift(str(lock), "--", sys.executable, "-c", "raise SystemExit(3)")
    assert done.returncode == 3
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("UPSTREAM BREAK?") and f"numpy 0.0.1 → {numpy}" in last


def test_a_passing_command_passes_through_its_status(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==0.0.1\n")
    done = drift(str(lock), "--", sys.executable, "-c", "pass")
    assert done.returncode == 0 and "the newest releases pass" in done.stdout
