"""The typed manifests: read, checked in one place with one line, and written back unchanged."""

from __future__ import annotations

import json

import pytest

from edge_lora.formats import (
    AdapterError,
    AdapterManifest,
    ExportError,
    ExportManifest,
    KernelGraph,
    ProfileError,
    ProfileReport,
)

EXPORT = {
    "format_version": 1,
    "kind": "export",
    "flavor": "adapters",
    "graph": "builder",
    "precision": "int4",
    "model_file": "model.onnx",
    "kv_cache": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "context_length": 256, "shared_buffer": True},
    "eos_token_ids": [2],
    "adapters": {"a": {"file": "adapters/a.onnx_adapter", "inputs": ["x.lora_A"]}},
    "kernels": {
        "lora_add": {
            "model_file": "model.lora.onnx",
            "format": 1,
            "data_files": ["model.onnx.data"],
            "adapters": {"a": {"file": "adapters/a.q4.onnx_adapter"}},
        }
    },
    "files": {"model.onnx": "00"},
    "parity": {"a": {"passed": True}},
    "a_key_from_a_newer_version": {"kept": True},
}


def write(tmp_path, name, doc):
    (tmp_path / name).write_text(json.dumps(doc))
    return tmp_path


def test_export_manifest_gives_attributes_and_round_trips(tmp_path):
    manifest = ExportManifest.load(write(tmp_path, "export.json", EXPORT))
    assert manifest.kv_cache.context_length == 256 and manifest.kv_cache.shared_buffer
    assert manifest.adapters["a"].file == "adapters/a.onnx_adapter"
    lora = manifest.graph_entry("lora_add")
    assert isinstance(lora, KernelGraph) and lora.data_files == ("model.onnx.data",)
    assert manifest.graph_entry(None) is manifest and manifest.data_files == ()
    assert manifest.to_dict() == EXPORT  # unknown keys and nested extras are written back, absent ones stay absent
    (tmp_path / "again").mkdir()
    manifest.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "export.json").read_text()) == EXPORT


def test_an_older_export_gets_the_defaults():
    doc = {k: EXPORT[k] for k in ("model_file", "files", "kv_cache")}
    manifest = ExportManifest.from_dict(doc, "old/export.json")
    assert (manifest.flavor, manifest.graph, manifest.kernels, manifest.adapters) == ("merged", "optimum", {}, {})
    assert manifest.to_dict() == doc


@pytest.mark.parametrize("graph", ["torch", "builder", "optimum"])
def test_every_graph_kind_reads_back_and_none_other(graph):
    """The graph "optimum", which exports made before transformers 5 record, stays readable beside those written now."""
    manifest = ExportManifest.from_dict(EXPORT | {"graph": graph}, "x/export.json")
    assert manifest.graph == graph and manifest.to_dict()["graph"] == graph
    with pytest.raises(ExportError, match=r"'graph' is 'onnx'"):
        ExportManifest.from_dict(EXPORT | {"graph": "onnx"}, "x/export.json")


def test_every_problem_is_named_on_one_line():
    doc = json.loads(json.dumps(EXPORT))
    del doc["files"]
    doc["kv_cache"]["num_layers"] = "2"
    doc["flavor"] = "fused"
    with pytest.raises(ExportError) as caught:
        ExportManifest.from_dict(doc, "x/export.json")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("x/export.json: ") and message.endswith("— re-run edge-lora export")
    for problem in ("lacks 'files'", "'kv_cache.num_layers' is str, expected int", "'flavor' is 'fused'"):
        assert problem in message


def test_missing_dir_file_and_bad_json_say_what_to_do(tmp_path):
    with pytest.raises(ExportError, match="does not exist — pass the --output dir of edge-lora export"):
        ExportManifest.load(tmp_path / "nowhere")
    with pytest.raises(ExportError, match="no export.json"):
        ExportManifest.load(tmp_path)
    (tmp_path / "export.json").write_text("{")
    with pytest.raises(ExportError, match="is not valid JSON"):
        ExportManifest.load(tmp_path)
    with pytest.raises(AdapterError, match="has no edge_lora.json — pass a dir written by edge-lora train"):
        AdapterManifest.load(tmp_path)


def test_adapter_manifest(tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("")
    doc = {
        "format_version": 1,
        "kind": "adapter",
        "base_model": "base",
        "base_fingerprint": {"digest": "ab"},
        "training": {"quant": {"quant_type": "nf4"}},
        "lora": {"r": 8},
        "data": {"eval": {"path": str(eval_file)}},
        "data_card": None,
    }
    manifest = AdapterManifest.load(write(tmp_path, "edge_lora.json", doc))
    assert (manifest.base_digest, manifest.eval_data_path, manifest.data_card) == ("ab", eval_file, None)
    assert manifest.to_dict() == doc
    eval_file.unlink()
    assert manifest.eval_data_path is None
    with pytest.raises(AdapterError, match="'lora' is list, expected an object"):
        AdapterManifest.from_dict(doc | {"lora": []}, "edge_lora.json")


def test_profile_report_checks_its_schema():
    report = {
        "schema": "edge-lora/profile",
        "schema_version": 3,
        "host": {},
        "device_profile": {"name": "x"},
        "exports": [],
        "settings": {},
        "configurations": [],
        "created": "now",
    }
    assert ProfileReport.from_dict(report, "p.json").to_dict() == report
    with pytest.raises(ProfileError, match="is not a profile report: schema 'other'"):
        ProfileReport.from_dict(report | {"schema": "other"}, "p.json")
    with pytest.raises(ProfileError, match="schema_version 2, expected 3 — profile again"):
        ProfileReport.from_dict(report | {"schema_version": 2}, "p.json")
