"""The profiler on tiny real exports: a sweep over two precisions × providers (one this host lacks) × threads ×
prompt lengths gives sane figures and "unavailable" rows; reports round-trip through JSON, CSV, Markdown and PNG;
`compare` finds a known ratio and gates on it; traces name their top operators; bad input gets one line."""

import csv
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from edge_lora.runtime.compare import compare, load_report, parse_margin
from edge_lora.runtime.package import open_export, sha256_file
from edge_lora.runtime.profile import (MEASURED_BANDWIDTH_SOURCE, ProfileError, ProfileSettings, profile,
                                       summarize)
from edge_lora.runtime.report import CSV_COLUMNS, CSV_FIGURES, PLOTS_SKIPPED, render_table, write_report

CONTEXT = 256
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"  # this CPU-only onnxruntime build lacks CUDA
SETTINGS = ProfileSettings(threads=(1, 2), prompt_lens=(8, 16), new_tokens=8, warmup_runs=1, min_runs=3,
                           min_seconds=0.1, providers=(CPU, CUDA))
# What the runtime must never bring into a process (DESIGN.md: layout).
HEAVY_MODULES = ("torch", "transformers", "peft", "bitsandbytes", "optimum", "accelerate",
                 "edge_lora.export", "edge_lora.trainer", "edge_lora.modeling", "edge_lora.tiny")


def write_manifest(out, precision, vocab_size, eos_token_id):
    manifest = {
        "model_file": "model.onnx",
        "files": {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != "export.json"},
        "kv_cache": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "context_length": CONTEXT},
        "eos_token_ids": [eos_token_id],
        "precision": precision,
        "flavor": "merged",
        "device": "cpu-x86-64",
        "vocab_size": vocab_size,
    }
    (out / "export.json").write_text(json.dumps(manifest, indent=2))


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
    write_manifest(out, "fp32", config.vocab_size, config.eos_token_id)
    return out


@pytest.fixture(scope="session")
def int8_export_dir(export_dir, tmp_path_factory):
    """The same export with int8 weights (onnxruntime dynamic quantization): a second precision to sweep."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp_path_factory.mktemp("export") / "int8"
    shutil.copytree(export_dir, out)
    quantize_dynamic(export_dir / "model.onnx", out / "model.onnx", weight_type=QuantType.QInt8)
    manifest = json.loads((export_dir / "export.json").read_text())
    write_manifest(out, "int8", manifest["vocab_size"], manifest["eos_token_ids"][0])
    return out


@pytest.fixture(scope="module")
def report(export_dir, int8_export_dir):
    return profile([export_dir, int8_export_dir], SETTINGS)


@pytest.fixture(scope="module")
def traced(export_dir, tmp_path_factory):
    settings = ProfileSettings(threads=(1,), prompt_lens=(8,), new_tokens=8, warmup_runs=1, min_runs=3,
                               min_seconds=0.1, trace=True, measure_bandwidth=True)
    return profile(export_dir, settings, trace_dir=tmp_path_factory.mktemp("traces"))


def measured(report):
    return [c for c in report["configurations"] if c["status"] == "ok"]


def slower(report, decode=2.0, e2e=1.25):
    """A copy of the report whose decode time is `decode` times and e2e time `e2e` times the original's,
    with every summary recomputed from the scaled samples; TTFT is left as it was."""
    report = json.loads(json.dumps(report))
    for c in measured(report):
        for s in c["samples"]:
            s["token_times_s"] = [t * decode for t in s["token_times_s"]]
            s["decode_s"] *= decode
            s["e2e_s"] *= e2e
        old = c["summary"]
        c["summary"] = summarize(c["samples"], c["prompt_len"], c["new_tokens"], old["load_s"],
                                 int(old["peak_rss_mb"] * 2**20), old["model_bytes"], old["bandwidth_gbs"],
                                 old["bandwidth_source"])
    return report


def test_report_describes_host_device_exports_and_settings(report, export_dir, int8_export_dir):
    assert set(report) == {"schema", "schema_version", "created", "host", "device_profile", "exports", "settings",
                           "configurations"}
    assert (report["schema"], report["schema_version"]) == ("edge-lora/profile", 2)
    assert report["created"].endswith("+00:00")
    host = report["host"]
    assert host["onnxruntime"] and host["physical_cores"] >= 1 and host["memory_mb"] >= 0
    assert CPU in host["available_providers"] and CUDA not in host["available_providers"]
    assert host["measured_bandwidth_gbs"] > 0
    assert report["device_profile"]["name"] == "cpu-x86-64"
    assert report["exports"] == [
        {"path": str(path.resolve()), "precision": precision, "digest": open_export(path).digest(), "flavor": "merged",
         "model_bytes": (path / "model.onnx").stat().st_size}
        for path, precision in ((export_dir, "fp32"), (int8_export_dir, "int8"))
    ]
    assert report["settings"]["prompt_lens"] == (8, 16) and report["settings"]["providers"] == (CPU, CUDA)


def test_sweep_covers_exports_providers_threads_and_prompt_lengths(report):
    configs = report["configurations"]
    assert [(c["export"]["precision"], c["provider"], c["threads"], c["prompt_len"]) for c in configs] == [
        (precision, provider, threads, prompt_len) for precision in ("fp32", "int8") for provider in (CPU, CUDA)
        for threads in (1, 2) for prompt_len in (8, 16)
    ]
    exports = {e["precision"]: e for e in report["exports"]}
    for c in configs:
        assert c["export"] == {k: exports[c["export"]["precision"]][k] for k in ("path", "precision", "digest")}
        assert c["new_tokens"] == SETTINGS.new_tokens and c["trace"] is None
        if c["provider"] == CPU:
            assert (c["status"], c["reason"], c["session_providers"]) == ("ok", None, [CPU])
        else:
            assert c["status"] == "unavailable" and (c["samples"], c["summary"], c["session_providers"]) == ([], None, [])
            assert c["reason"].startswith(f"{CUDA} is not in this onnxruntime") and CPU in c["reason"]


def test_every_measured_configuration_keeps_raw_samples_and_a_sane_summary(report):
    bandwidth = report["device_profile"]["memory"]["bandwidth_gbs"]
    model_bytes = {e["precision"]: e["model_bytes"] for e in report["exports"]}
    assert model_bytes["int8"] < model_bytes["fp32"]
    assert len(measured(report)) == 8
    for config in measured(report):
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
        assert s["model_bytes"] == s["bytes_per_token"] == model_bytes[config["export"]["precision"]]
        assert s["bandwidth_gbs"] == bandwidth and s["bandwidth_source"].startswith("device profile cpu-x86-64: ")
        assert s["bound_tokens_s"] == pytest.approx(bandwidth * 1e9 / s["model_bytes"])
        assert s["decode_fraction_of_bound"] == pytest.approx(s["decode_tokens_s"] / s["bound_tokens_s"])


def test_report_round_trips_through_json_csv_markdown_and_plots(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"json", "csv", "markdown", "latency_cdf", "decode_vs_prompt"}
    # JSON has no tuples: the settings' tuples come back as lists, all else as written.
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    with paths["csv"].open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(report["configurations"]) == 16
    for row, config in zip(rows, report["configurations"]):
        assert (row["status"], row["precision"], row["provider"], int(row["threads"]), int(row["prompt_len"])) == (
            config["status"], config["export"]["precision"], config["provider"], config["threads"], config["prompt_len"])
        if config["status"] == "ok":
            assert float(row["decode_tokens_s"]) == config["summary"]["decode_tokens_s"]
            assert float(row["e2e_mean_ci95_low_s"]) == config["summary"]["e2e_mean_ci95_s"][0]
        else:
            assert row["reason"] == config["reason"] and all(row[k] == "" for k in CSV_FIGURES)
    for name in ("latency_cdf", "decode_vs_prompt"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[name].stat().st_size > 1000
    markdown = paths["markdown"].read_text()
    table = render_table(report)
    assert table in markdown and "](latency_cdf.png)" in markdown and "](decode_vs_prompt.png)" in markdown
    rows = table.strip().splitlines()
    assert len(rows) == 2 + len(report["configurations"])
    assert rows[2].startswith("| fp32 | CPU | 1 | 8 |") and rows[-1].startswith("| int8 | CUDA | 2 | 16 | unavailable |")
    assert f"Unavailable: {report['configurations'][4]['reason']}" in markdown


def test_without_matplotlib_the_report_says_plots_were_skipped(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `from matplotlib.figure import` fail
    paths = write_report(report, tmp_path)
    assert set(paths) == {"json", "csv", "markdown"} and not list(tmp_path.glob("*.png"))
    assert PLOTS_SKIPPED in paths["markdown"].read_text()


def test_trace_summarises_top_operators_and_keeps_the_raw_trace(traced, tmp_path):
    (config,) = traced["configurations"]
    trace = config["trace"]
    ops = trace["top_ops"]
    assert "MatMul" in [o["op"] for o in ops] and 0 < len(ops) <= 10
    assert [o["total_ms"] for o in ops] == sorted((o["total_ms"] for o in ops), reverse=True)
    assert all(o["calls"] >= 1 and 0 < o["share"] <= 1 for o in ops) and sum(o["share"] for o in ops) <= 1 + 1e-9
    # One generation after the warm-up: prefill and one session run per later token.
    assert trace["model_runs"] == config["new_tokens"] and trace["kernel_ms"] > 0
    assert trace["file"].endswith("trace-00-fp32-CPU-t1-p8.json") and json.loads(open(trace["file"]).read())
    markdown = write_report(traced, tmp_path)["markdown"].read_text()
    assert "### Top operators: fp32 CPU t1 p8" in markdown and "| MatMul |" in markdown
    # measure_bandwidth: the bound comes from this host's measured bandwidth, and says so.
    s = config["summary"]
    assert (s["bandwidth_gbs"], s["bandwidth_source"]) == (traced["host"]["measured_bandwidth_gbs"],
                                                           MEASURED_BANDWIDTH_SOURCE)


def test_compare_finds_a_known_ratio_and_gates_on_the_margin(report):
    table, regressions = compare([report, slower(report)], None, names=["base", "new"])
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    assert rows[0][-3:] == ["decode × (new)", "TTFT × (new)", "e2e × (new)"]
    body = rows[2:]
    assert len(body) == 16 and regressions == []
    for row in body:
        if row[1] == "CPU":
            assert row[-3:] == ["0.50", "1.00", "1.25"]  # decode 2× slower, TTFT as it was, e2e 1.25×
        else:
            assert row[4] == row[-3] == "unavailable"
    _, regressions = compare([report, slower(report)], 0.10)
    assert len(regressions) == 16  # each of the 8 measured configurations, on decode and on e2e
    assert regressions[0].startswith("#2: fp32 CPU threads 1 prompt 8: decode ") and "50% lower" in regressions[0]
    assert "e2e p50" in regressions[1] and "25% higher" in regressions[1]
    assert compare([report, slower(report)], 0.60)[1] == []
    assert compare([report, report, slower(report, decode=1.0, e2e=1.0)], 0.0)[1] == []


def test_compare_and_margin_reject_bad_input(report, tmp_path):
    with pytest.raises(ProfileError, match=r"compare needs two or more reports, got 1"):
        compare([report], 0.1)
    v1 = json.loads(json.dumps(report)) | {"schema_version": 1}
    with pytest.raises(ProfileError, match=r"#2 has schema_version 1, expected 2 — profile again"):
        compare([report, v1], 0.1)
    twice = json.loads(json.dumps(report))
    twice["configurations"].append(twice["configurations"][0])
    with pytest.raises(ProfileError, match=r"#1 has two configurations of fp32 CPU threads 1 prompt 8"):
        compare([twice, report])
    with pytest.raises(ProfileError, match=r"nope.json does not exist — pass a profile.json"):
        load_report(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileError, match=r"bad.json is not JSON"):
        load_report(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"schema": "something/else"}')
    with pytest.raises(ProfileError, match=r"other.json is not a profile report: schema 'something/else'"):
        load_report(tmp_path / "other.json")
    assert (parse_margin("10%"), parse_margin("12.5%"), parse_margin("0%")) == (0.10, 0.125, 0.0)
    for text in ("10", "ten%", "-5%", "0.1"):
        with pytest.raises(ProfileError, match=rf"--fail-if-slower '{text}' is not a percentage — .* for example 10%"):
            parse_margin(text)


def edge_lora(*args):
    return subprocess.run([sys.executable, "-m", "edge_lora", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_cli_compare_exits_0_on_pass_1_on_regression_2_on_bad_input(report, tmp_path):
    base, new, v1 = tmp_path / "base.json", tmp_path / "new.json", tmp_path / "v1.json"
    base.write_text(json.dumps(report))
    new.write_text(json.dumps(slower(report)))
    v1.write_text(json.dumps(report | {"schema_version": 1}))
    done = edge_lora("profile", "compare", base, new, "--fail-if-slower", "60%")
    assert done.returncode == 0, done.stderr
    assert "| fp32 | CPU | 1 | 8 |" in done.stdout and "| 0.50 | 1.00 | 1.25 |" in done.stdout
    done = edge_lora("profile", "compare", base, new, "--fail-if-slower", "10%")
    assert done.returncode == 1, done.stderr
    assert "16 regression(s) beyond 10%:" in done.stdout and f"{new}: fp32 CPU threads 1 prompt 8: decode" in done.stdout
    for args, message in [((base, tmp_path / "missing.json"), "missing.json does not exist"),
                          ((base, new, "--fail-if-slower", "10"), "'10' is not a percentage"),
                          ((base, new, "--fail-if-slower", "ten%"), "'ten%' is not a percentage"),
                          ((base, v1), "v1.json has schema_version 1, expected 2")]:
        done = edge_lora("profile", "compare", *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_cli_profiles_several_exports_with_trace_and_measured_bandwidth(export_dir, int8_export_dir, tmp_path):
    out = tmp_path / "prof"
    done = edge_lora("profile", export_dir, int8_export_dir, "--providers", f"{CPU},{CUDA}", "--threads", "1",
                     "--prompt-lens", "8", "--new-tokens", "4", "--warmup-runs", "0", "--min-runs", "1",
                     "--min-seconds", "0", "--trace", "--measure-bandwidth", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "| int8 | CUDA | 1 | 8 | unavailable |" in done.stdout and f"{out / 'profile.csv'}" in done.stdout
    report = load_report(out / "profile.json")
    assert [c["status"] for c in report["configurations"]] == ["ok", "unavailable", "ok", "unavailable"]
    assert sorted(p.name for p in out.glob("trace-*.json")) == ["trace-00-fp32-CPU-t1-p8.json",
                                                                "trace-02-int8-CPU-t1-p8.json"]
    assert report["settings"]["trace"] and report["settings"]["measure_bandwidth"]
    assert all((out / name).stat().st_size > 0 for name in ("latency_cdf.png", "decode_vs_prompt.png", "profile.md"))
    done = edge_lora("profile", export_dir, "--providers", "NoSuchExecutionProvider", "--out", out)
    assert done.returncode == 2 and done.stderr.startswith(
        "error: providers 'NoSuchExecutionProvider' do not exist in onnxruntime — available here: "), done.stderr


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"new_tokens": 1}, r"new_tokens=1 must be >= 2: the first token comes with prefill"),
    ({"threads": (2, -1)}, r"threads=\[2, -1\] must be one or more counts >= 0"),
    ({"prompt_lens": ()}, r"prompt_lens=\[\] must be one or more lengths >= 1"),
    ({"min_runs": 0, "min_seconds": -1.0}, r"min_runs=0 must be >= 1; min_seconds=-1.0 must be >= 0"),
    ({"providers": ()}, r"providers=\(\) is empty — name at least one"),
    ({"providers": (CPU, "CPUProvider")}, r"providers 'CPUProvider' do not exist in onnxruntime — available here: .*CPU"),
    ({"providers": (CPU, CPU)}, r"providers=\['CPUExecutionProvider', 'CPUExecutionProvider'\] names one twice"),
])
def test_bad_settings_raise_one_line_naming_the_value(kwargs, message):
    with pytest.raises(ProfileError, match=message):
        ProfileSettings(**kwargs)


def test_prompt_and_new_tokens_over_the_context_raise_naming_both(export_dir):
    with pytest.raises(ProfileError, match=r"prompt_len 250 \+ new_tokens 8 exceeds the context of 256 tokens"):
        profile([export_dir], ProfileSettings(prompt_lens=(8, 250), new_tokens=8))
    with pytest.raises(ProfileError, match=r"no export dir given"):
        profile([], ProfileSettings())


def test_profiling_imports_no_torch_nor_train_or_export_code(export_dir, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        import psutil
        from edge_lora.runtime.compare import compare
        from edge_lora.runtime.profile import ProfileSettings, profile
        from edge_lora.runtime.report import write_report
        report = profile({str(export_dir)!r}, ProfileSettings(prompt_lens=(4,), new_tokens=2, warmup_runs=0,
                                                              min_runs=1, min_seconds=0, trace=True))
        write_report(report, {str(tmp_path)!r})
        compare([report, report], 0.1)
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
