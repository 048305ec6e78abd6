"""The runtime ships to devices without PyTorch: importing it must not pull in any training library."""

from import_probe import heavy_modules_after


def test_runtime_import_is_torch_free():
    assert heavy_modules_after("import edge_lora.runtime") == []


def test_package_and_cli_imports_are_light():
    # The CLI imports each stage's dependencies inside its command, so --help and `run` stay fast.
    assert heavy_modules_after("import edge_lora, edge_lora.cli, edge_lora.devices") == []


def test_runtime_generation_is_torch_free(export_fp32):
    code = (
        "from edge_lora import runtime\n"
        f"g = runtime.load({str(export_fp32)!r})\n"
        "g.generate('2024-03-17 ->', runtime.SamplingConfig(max_new_tokens=8))"
    )
    assert heavy_modules_after(code) == []
