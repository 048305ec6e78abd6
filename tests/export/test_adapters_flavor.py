"""Flavor `adapters`: one base graph, one .onnx_adapter per adapter, switched per call without reloading."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_lora.errors import UsageError


@pytest.fixture(scope="module", params=["torch", "builder"])
def shared_export(adapter_dir, second_adapter, tmp_path_factory, request):
    """Both adapters beside one fp32 base graph: torch's, and the builder's (q, k and v packed in one MatMul,
    where the second adapter's q and v branches meet a rank-0 k)."""
    from edge_lora.export import ExportOptions, export

    out = tmp_path_factory.mktemp("shared") / request.param
    return export(
        [adapter_dir, second_adapter], out, ExportOptions(flavor="adapters", graph=request.param), show_progress=False
    )


def test_every_adapter_and_the_base_pass_parity(shared_export, adapter_dir, second_adapter):
    manifest = json.loads((shared_export / "export.json").read_text())
    assert (manifest["flavor"], manifest["graph"]) == ("adapters", shared_export.name)
    assert set(manifest["adapters"]) == {adapter_dir.name, second_adapter.name}
    assert set(manifest["parity"]) == {adapter_dir.name, second_adapter.name, "base"}
    for report in manifest["parity"].values():
        assert report["passed"] and report["max_abs_logit_diff"] <= 1e-3
    assert {f"adapters/{adapter_dir.name}.onnx_adapter", "model.onnx"} <= set(manifest["files"])


def test_switching_adapters_matches_the_merged_export(shared_export, export_fp32, adapter_dir):
    from edge_lora import runtime

    shared, merged = runtime.load(shared_export), runtime.load(export_fp32)
    ids = [1, 20, 21, 22, 23, 24, 25]
    with_adapter = shared.with_adapter(adapter_dir.name)
    base = shared.with_adapter(None)
    # same weights in another order of operations: x@W + (x@A)@B against x@(W + BA)
    np.testing.assert_allclose(with_adapter.logits(ids), merged.logits(ids), rtol=0, atol=1e-4)
    assert np.abs(base.logits(ids) - merged.logits(ids)).max() > 1e-2
    np.testing.assert_allclose(
        shared.with_adapter(adapter_dir.name).logits(ids), with_adapter.logits(ids), rtol=0, atol=0
    )
    assert with_adapter.session is shared.session  # no reload


def test_each_adapter_generates_its_own_task(shared_export, adapter_dir, second_adapter, eval_samples):
    from edge_lora import runtime

    generator = runtime.load(shared_export)
    upper = generator.with_adapter(second_adapter.name).generate("hello:", runtime.SamplingConfig(max_new_tokens=8))
    assert upper.text == "HELLO"
    dates = generator.with_adapter(adapter_dir.name)
    ref = runtime.load(shared_export).with_adapter(adapter_dir.name)
    prompt = eval_samples[0]["prompt"]
    assert dates.generate(prompt).token_ids == ref.generate(prompt).token_ids


def test_unknown_adapter_and_mixed_bases(shared_export, adapter_dir, make_base, tmp_path):
    from edge_lora import runtime

    with pytest.raises(runtime.PromptError, match=r"unknown adapter 'nope' — known adapters: "):
        runtime.load(shared_export).with_adapter("nope")
    done = subprocess.run(
        [sys.executable, "-m", "edge_lora", "run", str(shared_export), "--prompt", "x", "--adapter", "nope"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "unknown adapter 'nope'" in done.stderr
    from edge_lora.export import ExportOptions, export

    with pytest.raises(UsageError, match=r"flavor merged takes one adapter dir, got 2"):
        export([adapter_dir, adapter_dir], tmp_path / "x", ExportOptions())


@pytest.mark.parametrize("graph, precision", [("torch", "int4"), ("torch", "int8"), ("builder", "int4")])
def test_quantized_adapters_exports_keep_their_lora_inputs(adapter_dir, second_adapter, tmp_path, graph, precision):
    # The LoRA A/B are graph inputs with placeholder initializers: a weight quantizer must leave their MatMuls
    # alone, or it bakes the placeholders in and no adapter can be applied.
    from edge_lora import runtime
    from edge_lora.export import ExportOptions, export

    # No gate: the second adapter names no eval set, so its parity prompts are generic text it was never trained
    # on, where near-tied logits flip under 4-bit rounding; its own task below is the check that matters.
    options = ExportOptions(flavor="adapters", precision=precision, graph=graph, validate=False)
    generator = runtime.load(export([adapter_dir, second_adapter], tmp_path / precision, options, show_progress=False))
    sampling = runtime.SamplingConfig(max_new_tokens=8)
    assert generator.with_adapter(second_adapter.name).generate("hello:", sampling).text == "HELLO"
    assert generator.with_adapter(None).generate("hello:", sampling).text != "HELLO"
