"""The profiler on a tiny real export: every report field is there and sane, the report round-trips through its
files, bad settings get one-line messages, and profiling never imports torch or the train/export code."""

import json
import subprocess
import sys
import textwrap

import pytest

from edge_lora.runtime.package import open_export, sha256_file
from edge_lora.runtime.profile import ProfileSettings, profile, render_table, write_report

CONTEXT = 256
SETTINGS = ProfileSettings(threads=(1,), prompt_lens=(8, 16), new_tokens=8, warmup_runs=1, min_runs=3,
                           min_seconds=0.2)
# What the runtime must never bring into a process (DESIGN.md: layout).
HEAVY_MODULES = ("torch", "transformers", "peft", "bitsandbytes", "optimum", "accelerate",
                 "edge_lora.export", "edge_lora.trainer", "edge_lora.modeling", "edge_lora.tiny")


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """A random-weight Llama exported by optimum, with the export.json and tokenizer.json the runtime reads.

    Built without edge-lora's train/export pipeline, so that the profiler is tested on its own.
    """
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import LlamaForCausalLM

    from edge_lora.tiny import char_tokenizer, llama_config

    out = tmp_path_factory.mktemp("export")
    config = llama_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=CONTEXT)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    onnx_export_from_model(model, out, task="text-generation-with-past", opset=18, do_validation=False,
                           no_post_process=True)
    char_tokenizer().save_pretrained(out)
    manifest = {
        "model_file": "model.onnx",
        "files": {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()},
        "kv_cache": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "context_length": CONTEXT},
        "eos_token_ids": [config.eos_token_id],
        "precision": "fp32",
        "flavor": "merged",
        "device": "cpu-x86-64",
        "vocab_size": config.vocab_size,
    }
    (out / "export.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def report(export_dir):
    return profile(export_dir, SETTINGS)


def test_report_describes_host_device_export_and_settings(report, export_dir):
    assert set(report) == {"schema", "schema_version", "created", "host", "device_profile", "export", "settings",
                           "configurations"}
    assert (report["schema"], report["schema_version"]) == ("edge-lora/profile", 1)
    assert report["created"].endswith("+00:00")
    host = report["host"]
    assert host["onnxruntime"] and host["physical_cores"] >= 1 and host["memory_mb"] >= 0
    assert "CPUExecutionProvider" in host["available_providers"] and host["measured_bandwidth_gbs"] > 0
    assert report["device_profile"]["name"] == "cpu-x86-64"
    assert report["export"] == {"path": str(export_dir.resolve()), "digest": open_export(export_dir).digest(),
                                "precision": "fp32", "flavor": "merged"}
    assert report["settings"]["prompt_lens"] == (8, 16) and report["settings"]["min_runs"] == 3


def test_every_configuration_keeps_raw_samples_and_a_sane_summary(report, export_dir):
    configs = report["configurations"]
    assert [(c["threads"], c["prompt_len"], c["new_tokens"]) for c in configs] == [(1, 8, 8), (1, 16, 8)]
    model_bytes = (export_dir / "model.onnx").stat().st_size
    bandwidth = report["device_profile"]["memory"]["bandwidth_gbs"]
    for config in configs:
        samples, s = config["samples"], config["summary"]
        for sample in samples:
            assert set(sample) == {"ttft_s", "decode_s", "e2e_s", "token_times_s"}
            assert len(sample["token_times_s"]) == SETTINGS.new_tokens - 1
            assert sample["decode_s"] == pytest.approx(sum(sample["token_times_s"]))
            assert 0 < sample["ttft_s"] and sample["ttft_s"] + sample["decode_s"] <= sample["e2e_s"]
        assert s["runs"] == len(samples) >= SETTINGS.min_runs
        assert sum(sample["e2e_s"] for sample in samples) >= SETTINGS.min_seconds
        assert s["load_s"] > 0 and s["peak_rss_mb"] > 0
        assert 0 < s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"]
        assert 0 < s["e2e_p50_s"] <= s["e2e_p90_s"] <= s["e2e_p99_s"]
        lo, hi = s["e2e_mean_ci95_s"]
        assert lo <= s["e2e_mean_s"] <= hi
        assert s["prefill_tokens_s"] == pytest.approx(config["prompt_len"] / s["ttft_p50_s"])
        assert s["tpot_p50_s"] > 0 and s["decode_tokens_s"] > 0
        assert s["model_bytes"] == s["bytes_per_token"] == model_bytes
        assert s["bandwidth_gbs"] == bandwidth
        assert s["bound_tokens_s"] == pytest.approx(bandwidth * 1e9 / model_bytes)
        assert s["decode_fraction_of_bound"] == pytest.approx(s["decode_tokens_s"] / s["bound_tokens_s"])
        assert s["decode_fraction_of_bound"] > 0


def test_report_round_trips_through_its_files(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"json", "markdown"}
    # JSON has no tuples: the settings' tuples come back as lists, all else as written.
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    markdown = paths["markdown"].read_text()
    table = render_table(report)
    assert markdown.endswith(table)
    rows = table.strip().splitlines()
    assert len(rows) == 2 + len(report["configurations"])
    assert rows[2].startswith("| 1 | 8 |") and rows[3].startswith("| 1 | 16 |")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"new_tokens": 1}, r"new_tokens=1 must be >= 2: the first token comes with prefill"),
    ({"threads": (2, -1)}, r"threads=\[2, -1\] must be one or more counts >= 0"),
    ({"prompt_lens": ()}, r"prompt_lens=\[\] must be one or more lengths >= 1"),
    ({"min_runs": 0, "min_seconds": -1.0}, r"min_runs=0 must be >= 1; min_seconds=-1.0 must be >= 0"),
    ({"providers": ()}, r"providers=\(\) is empty — name at least one"),
])
def test_bad_settings_raise_one_line_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProfileSettings(**kwargs)


def test_prompt_and_new_tokens_over_the_context_raise_naming_both(export_dir):
    with pytest.raises(ValueError, match=r"prompt_len 250 \+ new_tokens 8 exceeds the context of 256 tokens"):
        profile(export_dir, ProfileSettings(prompt_lens=(8, 250), new_tokens=8))


def test_profiling_imports_no_torch_nor_train_or_export_code(export_dir):
    script = textwrap.dedent(f"""
        import json, sys
        import psutil
        from edge_lora.runtime.profile import ProfileSettings, profile
        report = profile({str(export_dir)!r}, ProfileSettings(prompt_lens=(4,), new_tokens=2, warmup_runs=0,
                                                              min_runs=1, min_seconds=0))
        heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {HEAVY_MODULES!r}))
        print(json.dumps({{"heavy": heavy, "threads": report["configurations"][0]["threads"],
                          "cores": psutil.cpu_count(logical=False)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    # threads 0 took the cpu-x86-64 profile's intra_op_threads = 0, resolved to one per physical core.
    assert out["threads"] == out["cores"]
