"""Lineage: every export and adapter names its parents, and `edge-lora inspect` walks the chain back."""

from __future__ import annotations

import json
import shutil

from edge_lora.lineage import inspect, render


def test_export_lineage_names_adapter_base_and_data(export_int4, adapter_dir, base_dir, task_files):
    from edge_lora.runtime.package import sha256_file

    lineage = json.loads((export_int4 / "export.json").read_text())["lineage"]
    (record,) = lineage["adapters"]
    manifest = json.loads((adapter_dir / "edge_lora.json").read_text())
    assert record["path"] == str(adapter_dir.resolve())
    assert record["adapter_sha256"] == sha256_file(adapter_dir / "adapter_model.safetensors")
    assert record["base"] == {"model": str(base_dir), "fingerprint": manifest["base_fingerprint"]["digest"]}
    assert record["data"]["train"]["sha256"] == sha256_file(task_files[0])
    assert record["data"]["eval"]["sha256"] == sha256_file(task_files[1])
    assert lineage["settings"]["precision"] == "int4"


def test_inspect_an_export_prints_the_chain(capsys, export_int4, adapter_dir, task_files):
    from edge_lora.cli import main

    main(["inspect", str(export_int4)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"export {export_int4.resolve()}  (merged, int4")
    assert lines[1].startswith(f"└── adapter {adapter_dir.name}  {adapter_dir.resolve()}") and "[matches]" in lines[1]
    assert "data card: 256 samples" in lines[1] and "eval overlap 0/16" in lines[1]
    assert lines[2].startswith("    ├── base ") and "[not checked]" in lines[2]
    assert lines[3].startswith(f"    ├── train data {task_files[0]}") and "256 samples  [matches]" in lines[3]
    assert lines[4].startswith(f"    └── eval data {task_files[1]}") and "[matches]" in lines[4]
    main(["inspect", str(export_int4), "--json", "--verify-base"])
    tree = json.loads(capsys.readouterr().out)
    assert tree["kind"] == "export" and tree["precision"] == "int4"
    (adapter,) = tree["parents"]
    assert [p["kind"] for p in adapter["parents"]] == ["base", "train data", "eval data"]
    assert adapter["parents"][0]["status"] == "matches"


def test_inspect_flags_what_changed_since(tmp_path, adapter_dir, task_files):
    """A copy of the adapter whose manifest points at a copy of its data, which is then edited."""
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter, ignore=shutil.ignore_patterns("checkpoints"))
    data = tmp_path / "train.jsonl"
    shutil.copy(task_files[0], data)
    manifest = json.loads((adapter / "edge_lora.json").read_text())
    manifest["data"]["train"]["path"] = str(data)
    manifest["data"]["eval"]["path"] = str(tmp_path / "gone.jsonl")
    (adapter / "edge_lora.json").write_text(json.dumps(manifest))
    data.write_text(data.read_text() + '{"prompt": "2000-01-01 ->", "completion": " 01.01.2000"}\n')
    tree = inspect(adapter)
    assert tree["kind"] == "adapter" and tree["status"] == "this dir"
    statuses = {p["kind"]: p["status"] for p in tree["parents"]}
    assert statuses == {"base": "not checked", "train data": "changed", "eval data": "missing"}
    assert "[changed]" in render(tree) and "[missing]" in render(tree)


def test_inspect_a_dir_that_is_neither(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edge_lora", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is neither an export dir (export.json) nor an adapter dir (edge_lora.json)" in lines[0]
