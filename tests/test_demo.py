"""The demo end to end on a shorter training budget, and its failure message."""

import json

import pytest

from edge_lora.demo.run import GATE_POINTS, DemoStepError, run_demo


@pytest.mark.slow
def test_demo_runs_every_step_and_writes_its_summary(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=120)
    summary = run_demo(tmp_path, console=console, training_overrides={"max_steps": 150})
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    accuracy = summary["accuracy"]
    assert set(accuracy) == {"base", "qlora_pytorch", "onnx_fp32", "onnx_int4"}
    assert accuracy["base"] <= 0.1 < accuracy["qlora_pytorch"]
    assert accuracy["onnx_fp32"] == accuracy["qlora_pytorch"]  # merged fp32 computes what the 4-bit + LoRA model does
    for precision in ("fp32", "int4"):
        figures = summary["onnx"][precision]
        assert figures["parity"]["passed"] and figures["ttft_s"] > 0 and figures["decode_tokens_per_s"] > 0
    assert summary["onnx"]["int4"]["size_mb"] < 0.3 * summary["onnx"]["fp32"]["size_mb"]
    # the regression gate (edge-lora eval compare) on the same per-sample results: its figures are theirs
    gate = summary["int4_vs_fp32"]
    assert gate["delta_points"] == pytest.approx(100 * (accuracy["onnx_int4"] - accuracy["onnx_fp32"]))
    assert gate["passed"] == (gate["delta_points"] >= -GATE_POINTS or gate["p_value"] >= 0.05)
    text = console.export_text()
    assert "ONNX int4, runtime" in text and "int4 against fp32 on the same" in text


def test_a_failed_step_is_named_and_earlier_outputs_stay(tmp_path):
    (tmp_path / "data").write_text("a file where the task's folder should go")
    with pytest.raises(
        DemoStepError,
        match=r"demo step 2 \(write the date-reformatting task\) failed: .* earlier steps' outputs are kept",
    ):
        run_demo(tmp_path, training_overrides={"max_steps": 1})
    assert (tmp_path / "base" / "config.json").exists()
