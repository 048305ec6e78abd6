"""Export options and refusals: int4 head, external data, base fingerprints, broken adapters, killed exports."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_cli import assert_one_line_error, edge_lora

from edge_lora.errors import UsageError
from edge_lora.export import ExportOptions
from edge_lora.formats import AdapterManifest


def copy_adapter(adapter_dir, tmp_path):
    return shutil.copytree(adapter_dir, tmp_path / adapter_dir.name)


@pytest.mark.parametrize("graph, int4_matmuls", [("torch", 2 * 7), ("builder", 2 * 5)])  # builder: q, k, v packed
def test_int4_head_can_stay_full_precision(adapter_dir, tmp_path, graph, int4_matmuls):
    import onnx

    from edge_lora.export import ExportOptions, export

    # the graph's structure is under test here; the gate's int4 figures are the pipeline tests' business
    options = ExportOptions(precision="int4", int4_head=False, int4_block_size=16, validate=False, graph=graph)
    out = export(adapter_dir, tmp_path / "x", options, show_progress=False)
    nodes = onnx.load(str(out / "model.onnx")).graph.node
    head = next(n for n in nodes if "logits" in n.output)
    assert head.op_type == "MatMul"
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == int4_matmuls  # every other linear layer is int4
    assert json.loads((out / "export.json").read_text())["options"]["int4_block_size"] == 16


def test_weights_in_external_data(adapter_dir, tmp_path, monkeypatch):
    from edge_lora import runtime
    from edge_lora.export import ExportOptions, export
    from edge_lora.export.graphs import portable as onnx_graph

    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_BYTES", 0)  # what a model over 2 GB gets
    out = export(adapter_dir, tmp_path / "x", ExportOptions(validate=False, graph="torch"), show_progress=False)
    assert "model.onnx.data" in json.loads((out / "export.json").read_text())["files"]
    assert runtime.load(out).generate("2024-01-02 ->").token_ids


def test_graph_optimum_is_answered_with_its_replacement(tmp_path):
    """Device profiles and scripts written before transformers 5 may still ask for optimum's exporter."""
    done = edge_lora("export", str(tmp_path / "adapter"), "--output", str(tmp_path / "x"), "--graph", "optimum")
    assert_one_line_error(done, "optimum-onnx cannot be installed beside transformers 5", "use --graph torch")
    with pytest.raises(UsageError, match=r"graph 'optimum' cannot be written: .* use --graph torch"):
        ExportOptions(graph="optimum")


def test_merge_report_gives_both_choices(export_fp32):
    merge = json.loads((export_fp32 / "export.json").read_text())["merge"]
    assert merge["into"] == "dequantized"
    errors = merge["vs_trained_model"]
    # merging into the weights the adapter was trained against is exact; the original weights are not them
    assert errors["dequantized"]["max_abs_logit_diff"] < 1e-4 < errors["original"]["max_abs_logit_diff"]


def test_merge_is_the_same_after_evaluation_and_generation(adapter_dir, base_dir):
    from edge_lora.export.merge import merged_weights
    from edge_lora.train.reference import qlora_model

    model = qlora_model(adapter_dir, base_dir, AdapterManifest.load(adapter_dir))
    before = merged_weights(model)
    with torch.no_grad():
        model(torch.tensor([[1, 20, 21]]))
        model.generate(input_ids=torch.tensor([[1, 20, 21]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    after = merged_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_another_base_is_refused_unless_forced(adapter_dir, make_base, tmp_path):
    from edge_lora.export import export

    other = make_base(tmp_path / "other", seed=3)
    with pytest.raises(
        UsageError, match=r"--base .*other has fingerprint .* but .* was trained on .* pass that base, or --force"
    ):
        export(adapter_dir, tmp_path / "x", base=str(other), show_progress=False)


def test_unsupported_architecture_names_the_supported(adapter_dir, base_dir, tmp_path):
    from edge_lora.export import export

    fake = shutil.copytree(base_dir, tmp_path / "fake")
    config = json.loads((fake / "config.json").read_text())
    (fake / "config.json").write_text(json.dumps(config | {"model_type": "toaster"}))
    with pytest.raises(
        UsageError, match=r"architecture 'toaster' cannot be exported with a KV cache — supported: .*llama"
    ):
        export(adapter_dir, tmp_path / "x", base=str(fake), force=True, show_progress=False)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:100]), r"adapter_model.safetensors cannot be read"),
        (
            lambda p: __import__("safetensors.torch").torch.save_file(
                {k: v * float("nan") for k, v in __import__("safetensors.torch").torch.load_file(p).items()}, p
            ),
            r"holds NaN or inf — the adapter is broken",
        ),
    ],
    ids=["truncated", "nan"],
)
def test_broken_adapter_files(adapter_dir, tmp_path, damage, message):
    from edge_lora.export import export

    broken = copy_adapter(adapter_dir, tmp_path)
    damage(broken / "adapter_model.safetensors")
    with pytest.raises(UsageError, match=message):
        export(broken, tmp_path / "x", show_progress=False)
    assert not (tmp_path / "x").exists()


def test_killed_export_leaves_nothing_the_runtime_accepts(adapter_dir, tmp_path):
    from edge_lora import runtime

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_lora", "export", str(adapter_dir), "--output", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not any(".tmp-" in p.name for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the export's work
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    with pytest.raises(runtime.ExportError):
        runtime.load(out)
