"""The profiler on tiny real exports: a sweep over two precisions × providers (one this host lacks) × threads ×
prompt lengths, and over adapters on and off, gives sane figures and "unavailable" rows; bytes per token come from
the weight bytes export.json records (None where it records none); reports round-trip through JSON, CSV, Markdown
and PNG; `compare` finds a known ratio (across reports, and adapter on against off) and gates on it; traces name
their top operators; bad input gets one line."""

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edge_lora.export.graphs.weight_bytes import weight_bytes
from edge_lora.formats import ProfileReport
from edge_lora.runtime import ExportError
from edge_lora.runtime.package import open_export, sha256_file
from edge_lora.runtime.profile.compare import compare, load_report, parse_margin
from edge_lora.runtime.profile.report import CSV_COLUMNS, CSV_FIGURES, PLOTS_SKIPPED, render_table, write_report
from edge_lora.runtime.profile.summary import Facts, percentile_ci95, summarize
from edge_lora.runtime.profile.sweep import MEASURED_BANDWIDTH_SOURCE, ProfileError, ProfileSettings, profile

CONTEXT = 256
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"  # this CPU-only onnxruntime build lacks CUDA
SETTINGS = ProfileSettings(
    threads=(1, 2), prompt_lens=(8, 16), new_tokens=8, warmup_runs=1, min_runs=3, min_seconds=0.1, providers=(CPU, CUDA)
)
# What the runtime must never bring into a process: the training and export stack.
HEAVY_MODULES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "onnxscript",
    "accelerate",
    "edge_lora.export",
    "edge_lora.train.loop",
    "edge_lora.train.qlora",
    "edge_lora.tiny",
)


def write_manifest(out, precision, vocab_size, eos_token_id, adapters=(), count_weights=True):
    manifest = {
        "model_file": "model.onnx",
        **(weight_bytes(out / "model.onnx") if count_weights else {}),
        "files": {
            p.relative_to(out).as_posix(): sha256_file(p)
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "export.json"
        },
        "kv_cache": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "context_length": CONTEXT},
        "eos_token_ids": [eos_token_id],
        "precision": precision,
        "flavor": "adapters" if adapters else "merged",
        "device": "cpu-x86-64",
        "vocab_size": vocab_size,
    }
    if adapters:
        manifest["adapters"] = {name: {"file": f"adapters/{name}.onnx_adapter"} for name in adapters}
    (out / "export.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """A random-weight Llama exported by torch's ONNX exporter, with the export.json and tokenizer.json the runtime
    reads.

    Built without edge-lora's train/export pipeline, so that the profiler is tested on its own.
    """
    import torch
    from transformers import LlamaForCausalLM

    from edge_lora.export.graphs.portable import export_onnx
    from edge_lora.tiny import char_tokenizer, llama_config

    out = tmp_path_factory.mktemp("export")
    config = llama_config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    export_onnx(model, out, opset=18)
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


# LoRA branches of the adapters export: {module: (in_features, out_features)} of the tiny Llama (hidden 64, 2 KV
# heads of 16), and the rank of each adapter.
LORA_MODULES = {
    f"model.layers.{i}.self_attn.{name}": (64, out) for i in range(2) for name, out in (("q_proj", 64), ("v_proj", 32))
}
ADAPTER_RANKS = {"big": 32, "small": 4}


@pytest.fixture(scope="session")
def adapters_export_dir(export_dir, tmp_path_factory):
    """The same model as an export of flavor `adapters`: LoRA inputs on q_proj and v_proj, and two adapters of
    random weights (latency does not depend on weight values)."""
    import onnx

    from edge_lora.export.adapters import write_adapter
    from edge_lora.export.graphs.lora_inputs import add_torch_lora_inputs, input_names

    out = tmp_path_factory.mktemp("export") / "adapters"
    shutil.copytree(export_dir, out)
    onnx.save(add_torch_lora_inputs(onnx.load(str(export_dir / "model.onnx")), LORA_MODULES), str(out / "model.onnx"))
    (out / "adapters").mkdir()
    rng = np.random.default_rng(0)
    for name, rank in ADAPTER_RANKS.items():
        tensors = {}
        for module, (fan_in, fan_out) in LORA_MODULES.items():
            a, b = input_names(module)
            tensors[a] = rng.normal(0, 0.1, (fan_in, rank)).astype(np.float32)
            tensors[b] = rng.normal(0, 0.1, (rank, fan_out)).astype(np.float32)
        write_adapter(tensors, out / "adapters" / f"{name}.onnx_adapter")
    manifest = json.loads((export_dir / "export.json").read_text())
    write_manifest(out, "fp32", manifest["vocab_size"], manifest["eos_token_ids"][0], adapters=ADAPTER_RANKS)
    return out


def adapter_bytes(rank):
    return sum((fan_in * rank + rank * fan_out) * 4 for fan_in, fan_out in LORA_MODULES.values())


@pytest.fixture(scope="module")
def adapters_report(adapters_export_dir):
    settings = ProfileSettings(
        threads=(1,), prompt_lens=(8,), new_tokens=8, warmup_runs=1, min_runs=3, min_seconds=0.1, providers=(CPU, CUDA)
    )
    return profile(adapters_export_dir, settings)


@pytest.fixture(scope="module")
def report(export_dir, int8_export_dir):
    return profile([export_dir, int8_export_dir], SETTINGS)


@pytest.fixture(scope="module")
def traced(export_dir, tmp_path_factory):
    settings = ProfileSettings(
        threads=(1,),
        prompt_lens=(8,),
        new_tokens=8,
        warmup_runs=1,
        min_runs=3,
        min_seconds=0.1,
        trace=True,
        measure_bandwidth=True,
    )
    return profile(export_dir, settings, trace_dir=tmp_path_factory.mktemp("traces"))


def measured(report):
    return [c for c in report.configurations if c["status"] == "ok"]


def copied(report, **changes):
    """A deep copy of a report, with top-level keys replaced by `changes`."""
    return ProfileReport.from_dict(json.loads(json.dumps(report.to_dict())) | changes, "copy")


def slower(report, decode=2.0, e2e=1.25):
    """A copy of the report whose decode time is `decode` times and e2e time `e2e` times the original's,
    with every summary recomputed from the scaled samples; TTFT is left as it was."""
    report = copied(report)
    for c in measured(report):
        for s in c["samples"]:
            s["token_times_s"] = [t * decode for t in s["token_times_s"]]
            s["decode_s"] *= decode
            s["e2e_s"] *= e2e
        c["summary"] = resummarize(c)
    return report


def resummarize(config):
    """The summary of a configuration recomputed from its samples, with the facts its summary recorded."""
    facts = Facts(**{field.name: config["summary"][field.name] for field in dataclasses.fields(Facts)})
    return summarize(config["samples"], config["prompt_len"], config["new_tokens"], facts)


def test_report_describes_host_device_exports_and_settings(report, export_dir, int8_export_dir):
    assert set(report.to_dict()) == {
        "schema",
        "schema_version",
        "created",
        "host",
        "device_profile",
        "exports",
        "settings",
        "configurations",
    }
    assert (report.schema, report.schema_version) == ("edge-lora/profile", 3)
    assert report.created.endswith("+00:00")
    host = report.host
    assert host["onnxruntime"] and host["physical_cores"] >= 1 and host["memory_mb"] >= 0
    assert CPU in host["available_providers"] and CUDA not in host["available_providers"]
    assert host["measured_bandwidth_gbs"] > 0
    assert report.device_profile["name"] == "cpu-x86-64"
    assert report.exports == [
        {
            "path": str(path.resolve()),
            "precision": precision,
            "digest": open_export(path).digest(),
            "flavor": "merged",
            "model_file": "model.onnx",
            "model_bytes": (path / "model.onnx").stat().st_size,
            **weight_bytes(path / "model.onnx"),
            "adapter_bytes": {},
            "kernel_graphs": {},
        }
        for path, precision in ((export_dir, "fp32"), (int8_export_dir, "int8"))
    ]
    assert report.settings["prompt_lens"] == (8, 16) and report.settings["providers"] == (CPU, CUDA)


def test_sweep_covers_exports_providers_threads_and_prompt_lengths(report):
    configs = report.configurations
    assert [
        (c["export"]["precision"], c["adapter"], c["provider"], c["threads"], c["prompt_len"]) for c in configs
    ] == [
        (precision, None, provider, threads, prompt_len)
        for precision in ("fp32", "int8")
        for provider in (CPU, CUDA)
        for threads in (1, 2)
        for prompt_len in (8, 16)
    ]
    exports = {e["precision"]: e for e in report.exports}
    for c in configs:
        assert c["export"] == {k: exports[c["export"]["precision"]][k] for k in ("path", "precision", "digest")}
        assert c["new_tokens"] == SETTINGS.new_tokens and c["trace"] is None
        if c["provider"] == CPU:
            assert (c["status"], c["reason"], c["session_providers"], c["model_file"]) == (
                "ok",
                None,
                [CPU],
                "model.onnx",
            )
        else:
            assert c["status"] == "unavailable" and (c["samples"], c["summary"], c["session_providers"]) == (
                [],
                None,
                [],
            )
            assert c["model_file"] is None
            assert c["reason"].startswith(f"{CUDA} is not in this onnxruntime") and CPU in c["reason"]


def test_every_measured_configuration_keeps_raw_samples_and_a_sane_summary(report):
    bandwidth = report.device_profile["memory"]["bandwidth_gbs"]
    exports = {e["precision"]: e for e in report.exports}
    assert exports["int8"]["weight_bytes_per_token"] < exports["fp32"]["weight_bytes_per_token"]
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
        assert s["load_s"] > 0
        # Each configuration's own worker process: the interpreter alone (tens of MiB), then the tiny model's
        # session and runs on top, nothing of the profiling process nor of other configurations (hundreds of MiB).
        assert 10 < s["rss_before_load_mb"] < s["peak_rss_mb"] < s["rss_before_load_mb"] + 200
        assert 0 < s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"]
        assert 0 < s["e2e_p50_s"] <= s["e2e_p90_s"] <= s["e2e_p99_s"]
        lo, hi = s["e2e_mean_ci95_s"]
        assert lo <= s["e2e_mean_s"] <= hi
        for p, fewest in ((50, 6), (90, 36), (99, 368)):
            interval = s[f"e2e_p{p}_ci95_s"]
            assert (interval is None) == (s["runs"] < fewest)
            assert interval is None or interval[0] <= s[f"e2e_p{p}_s"] <= interval[1]
        assert s["prefill_tokens_s"] == pytest.approx(config["prompt_len"] / s["ttft_p50_s"])
        assert s["tpot_p50_s"] > 0 and s["decode_tokens_s"] > 0
        export = exports[config["export"]["precision"]]
        assert (s["model_bytes"], s["weight_bytes_per_token"], s["adapter_bytes_per_token"]) == (
            export["model_bytes"],
            export["weight_bytes_per_token"],
            0,
        )
        # 2 layers × keys and values × 2 KV heads × 16 × fp32 = 512 bytes a position; a mean past of prompt + 3
        assert s["kv_cache_bytes_per_token"] == 512 * (config["prompt_len"] + 3)
        assert s["bytes_per_token"] == s["weight_bytes_per_token"] + s["kv_cache_bytes_per_token"]
        assert s["bandwidth_gbs"] == bandwidth and s["bandwidth_source"].startswith("device profile cpu-x86-64: ")
        assert s["bound_tokens_s"] == pytest.approx(bandwidth * 1e9 / s["bytes_per_token"])
        assert s["decode_fraction_of_bound"] == pytest.approx(s["decode_tokens_s"] / s["bound_tokens_s"])


def test_percentile_interval_takes_order_statistics_from_the_binomial():
    # Six samples are the fewest whose extremes bound the median at 95%: P(all six on one side) = 2 × 0.5⁶ < 0.05.
    assert percentile_ci95(np.array([6.0, 1, 5, 2, 4, 3]), 50) == [1.0, 6.0]
    assert percentile_ci95(np.arange(5.0), 50) is None
    assert percentile_ci95(np.arange(35.0), 90) is None and percentile_ci95(np.arange(367.0), 99) is None
    # Coverage checked by simulation: of 2000 sets of 50 exponential samples, about 95% of the intervals hold the
    # true median ln 2 (at least 95% by construction, as order statistics give discrete levels).
    rng = np.random.default_rng(0)
    hits = [lo <= np.log(2) <= hi for lo, hi in (percentile_ci95(rng.exponential(size=50), 50) for _ in range(2000))]
    assert 0.94 <= np.mean(hits) <= 0.98


def test_an_export_without_weight_bytes_reports_none_for_them(export_dir, tmp_path):
    """An export.json that does not record its graph's weight bytes: those figures, and the bandwidth bound they
    give, are None; the rest is measured."""
    out = tmp_path / "unrecorded"
    shutil.copytree(export_dir, out)
    manifest = json.loads((out / "export.json").read_text())
    del manifest["weight_bytes"], manifest["weight_bytes_per_token"]
    (out / "export.json").write_text(json.dumps(manifest))
    report = profile(
        out, ProfileSettings(threads=(1,), prompt_lens=(8,), new_tokens=4, warmup_runs=0, min_runs=1, min_seconds=0.0)
    )
    (export,) = report.exports
    assert export["weight_bytes"] is None and export["weight_bytes_per_token"] is None
    (config,) = measured(report)
    s = config["summary"]
    assert [
        s[k] for k in ("weight_bytes_per_token", "bytes_per_token", "bound_tokens_s", "decode_fraction_of_bound")
    ] == [None] * 4
    assert s["decode_tokens_s"] > 0 and s["kv_cache_bytes_per_token"] > 0
    assert "unknown weight bytes read per token" in write_report(report, tmp_path / "report")["markdown"].read_text()


def test_report_round_trips_through_json_csv_markdown_and_plots(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"json", "csv", "markdown", "latency_cdf", "decode_vs_prompt"}
    # JSON has no tuples: the settings' tuples come back as lists, all else as written.
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report.to_dict()))
    with paths["csv"].open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(report.configurations) == 16
    for row, config in zip(rows, report.configurations):
        assert (row["status"], row["precision"], row["provider"], int(row["threads"]), int(row["prompt_len"])) == (
            config["status"],
            config["export"]["precision"],
            config["provider"],
            config["threads"],
            config["prompt_len"],
        )
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
    assert len(rows) == 2 + len(report.configurations)
    assert rows[2].startswith("| fp32 | — | CPU | 1 | 8 |")
    assert rows[-1].startswith("| int8 | — | CUDA | 2 | 16 | unavailable |")
    assert f"Unavailable: {report.configurations[4]['reason']}" in markdown


def test_without_matplotlib_the_report_says_plots_were_skipped(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `from matplotlib.figure import` fail
    paths = write_report(report, tmp_path)
    assert set(paths) == {"json", "csv", "markdown"} and not list(tmp_path.glob("*.png"))
    assert PLOTS_SKIPPED in paths["markdown"].read_text()


def test_trace_summarises_top_operators_and_keeps_the_raw_trace(traced, tmp_path):
    (config,) = traced.configurations
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
    assert (s["bandwidth_gbs"], s["bandwidth_source"]) == (
        traced.host["measured_bandwidth_gbs"],
        MEASURED_BANDWIDTH_SOURCE,
    )


def test_compare_finds_a_known_ratio_and_gates_on_the_margin(report):
    table, regressions = compare([report, slower(report)], None, names=["base", "new"])
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")
    ]
    assert rows[0][-3:] == ["decode × (new)", "TTFT × (new)", "e2e × (new)"]
    body = rows[2:]
    assert len(body) == 16 and regressions == []
    for row in body:
        if row[2] == "CPU":
            assert row[-3:] == ["0.50", "1.00", "1.25"]  # decode 2× slower, TTFT as it was, e2e 1.25×
        else:
            assert row[5] == row[-3] == "unavailable"
    _, regressions = compare([report, slower(report)], 0.10)
    assert len(regressions) == 16  # each of the 8 measured configurations, on decode and on e2e
    assert regressions[0].startswith("#2: fp32 CPU threads 1 prompt 8: decode ") and "50% lower" in regressions[0]
    assert "e2e p50" in regressions[1] and "25% higher" in regressions[1]
    assert compare([report, slower(report)], 0.60)[1] == []
    assert compare([report, report, slower(report, decode=1.0, e2e=1.0)], 0.0)[1] == []


def test_adapters_sweep_each_adapter_against_none(adapters_report, export_dir):
    configs = adapters_report.configurations
    assert [(c["adapter"], c["provider"], c["status"]) for c in configs] == [
        (adapter, provider, "ok" if provider == CPU else "unavailable")
        for adapter in (None, "big", "small")
        for provider in (CPU, CUDA)
    ]
    (export,) = adapters_report.exports
    assert export["flavor"] == "adapters"
    assert export["adapter_bytes"] == {name: adapter_bytes(rank) for name, rank in ADAPTER_RANKS.items()}
    # The LoRA inputs' rank-0 defaults weigh nothing: the base weights read per token are the merged export's.
    assert export["weight_bytes_per_token"] == weight_bytes(export_dir / "model.onnx")["weight_bytes_per_token"]
    for c in measured(adapters_report):
        s = c["summary"]
        assert s["adapter_bytes_per_token"] == (adapter_bytes(ADAPTER_RANKS[c["adapter"]]) if c["adapter"] else 0)
        assert s["bytes_per_token"] == (
            s["weight_bytes_per_token"] + s["adapter_bytes_per_token"] + s["kv_cache_bytes_per_token"]
        )
        assert s["runs"] >= 3 and 0 < s["e2e_p50_s"] <= s["e2e_p90_s"] <= s["e2e_p99_s"]


def test_adapter_rows_in_the_table_csv_and_markdown(adapters_report, tmp_path):
    paths = write_report(adapters_report, tmp_path)
    table = render_table(adapters_report)
    assert "| fp32 | — | CPU | 1 | 8 |" in table and "| fp32 | small | CUDA | 1 | 8 | unavailable |" in table
    with paths["csv"].open(newline="") as file:
        assert [row["adapter"] for row in csv.DictReader(file)] == ["", "", "big", "big", "small", "small"]
    markdown = paths["markdown"].read_text()
    assert "## Adapters against the base model" in markdown and "| fp32 | big | CPU | 1 | 8 |" in markdown


def test_compare_ratios_adapter_on_against_off_with_a_known_ratio(adapters_report):
    report = copied(adapters_report)
    off, on = (next(c for c in measured(report) if c["adapter"] == name) for name in (None, "small"))
    # "small" made 2× slower to decode than the base model, everything else as the base model measured it.
    on["samples"] = [
        s | {"decode_s": s["decode_s"] * 2, "token_times_s": [t * 2 for t in s["token_times_s"]]}
        for s in off["samples"]
    ]
    on["summary"] = resummarize(on)
    table, regressions = compare([report], 0.1, names=["one"])  # one report: adapter on ÷ off only
    assert regressions == []
    rows = {
        row[1]: row
        for row in (
            [cell.strip() for cell in line.strip("|").split("|")]
            for line in table.splitlines()
            if line.startswith("| fp32")
        )
    }
    assert set(rows) == {"big", "small"}
    bytes_ratio = on["summary"]["bytes_per_token"] / off["summary"]["bytes_per_token"]
    assert rows["small"][-4:] == ["0.50", "1.00", "1.00", f"{bytes_ratio:.2f}"] and bytes_ratio > 1
    # Across reports, configurations are matched with their adapter: only "small" regressed. In the base report
    # "small" decodes as the base model did, so its decode halves exactly (its e2e rises by decode's share of it,
    # which the measured timings decide: a second line for "small" may or may not come).
    base = copied(adapters_report)
    base_off, base_on = (next(c for c in measured(base) if c["adapter"] == name) for name in (None, "small"))
    base_on["samples"] = [dict(s) for s in base_off["samples"]]
    base_on["summary"] = resummarize(base_on)
    table, regressions = compare([base, report], 0.1, names=["base", "new"])
    assert "| fp32 | small | CPU | 1 | 8 |" in table and "Adapters against the base model in new" in table
    assert {r.split(":")[1] for r in regressions} == {" fp32 +small CPU threads 1 prompt 8"}
    assert any("decode" in r and "50% lower" in r for r in regressions), regressions


def test_compare_and_margin_reject_bad_input(report, tmp_path):
    with pytest.raises(
        ProfileError,
        match=r"compare needs two or more reports, or one with adapter-on and "
        r"adapter-off configurations, got 1 report\(s\)",
    ):
        compare([report], 0.1)
    with pytest.raises(ProfileError, match=r"#2 has schema_version 1, expected 3 — profile again"):
        ProfileReport.from_dict(report.to_dict() | {"schema_version": 1}, "#2")
    twice = copied(report)
    twice.configurations.append(twice.configurations[0])
    with pytest.raises(ProfileError, match=r"#1 has two configurations of fp32 CPU threads 1 prompt 8"):
        compare([twice, report])
    with pytest.raises(ProfileError, match=r"nope.json does not exist — pass a profile.json"):
        load_report(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileError, match=r"bad.json is not valid JSON"):
        load_report(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"schema": "something/else"}')
    with pytest.raises(ProfileError, match=r"other.json is not a profile report: schema 'something/else'"):
        load_report(tmp_path / "other.json")
    assert (parse_margin("10%"), parse_margin("12.5%"), parse_margin("0%")) == (0.10, 0.125, 0.0)
    for text in ("10", "ten%", "-5%", "0.1"):
        with pytest.raises(ProfileError, match=rf"--fail-if-slower '{text}' is not a percentage — .* for example 10%"):
            parse_margin(text)


def edge_lora(*args):
    return subprocess.run(
        [sys.executable, "-m", "edge_lora", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_cli_compare_exits_0_on_pass_1_on_regression_2_on_bad_input(report, tmp_path):
    base, new, v1 = tmp_path / "base.json", tmp_path / "new.json", tmp_path / "v1.json"
    base.write_text(json.dumps(report.to_dict()))
    new.write_text(json.dumps(slower(report).to_dict()))
    v1.write_text(json.dumps(report.to_dict() | {"schema_version": 1}))
    done = edge_lora("profile", "compare", base, new, "--fail-if-slower", "60%")
    assert done.returncode == 0, done.stderr
    assert "| fp32 | — | CPU | 1 | 8 |" in done.stdout and "| 0.50 | 1.00 | 1.25 |" in done.stdout
    done = edge_lora("profile", "compare", base, new, "--fail-if-slower", "10%")
    assert done.returncode == 1, done.stderr
    assert (
        "16 regression(s) beyond 10%:" in done.stdout and f"{new}: fp32 CPU threads 1 prompt 8: decode" in done.stdout
    )
    for args, message in [
        ((base, tmp_path / "missing.json"), "missing.json does not exist"),
        ((base, new, "--fail-if-slower", "10"), "'10' is not a percentage"),
        ((base, new, "--fail-if-slower", "ten%"), "'ten%' is not a percentage"),
        ((base, v1), "v1.json has schema_version 1, expected 3"),
    ]:
        done = edge_lora("profile", "compare", *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_cli_profiles_several_exports_with_trace_and_measured_bandwidth(export_dir, int8_export_dir, tmp_path):
    out = tmp_path / "prof"
    done = edge_lora(
        "profile",
        export_dir,
        int8_export_dir,
        "--providers",
        f"{CPU},{CUDA}",
        "--threads",
        "1",
        "--prompt-lens",
        "8",
        "--new-tokens",
        "4",
        "--warmup-runs",
        "0",
        "--min-runs",
        "1",
        "--min-seconds",
        "0",
        "--trace",
        "--measure-bandwidth",
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr
    assert "| int8 | — | CUDA | 1 | 8 | unavailable |" in done.stdout and f"{out / 'profile.csv'}" in done.stdout
    report = load_report(out / "profile.json")
    assert [c["status"] for c in report.configurations] == ["ok", "unavailable", "ok", "unavailable"]
    assert sorted(p.name for p in out.glob("trace-*.json")) == [
        "trace-00-fp32-CPU-t1-p8.json",
        "trace-02-int8-CPU-t1-p8.json",
    ]
    assert report.settings["trace"] and report.settings["measure_bandwidth"]
    assert all((out / name).stat().st_size > 0 for name in ("latency_cdf.png", "decode_vs_prompt.png", "profile.md"))
    done = edge_lora("profile", export_dir, "--providers", "NoSuchExecutionProvider", "--out", out)
    assert done.returncode == 2 and done.stderr.startswith(
        "error: providers 'NoSuchExecutionProvider' do not exist in onnxruntime — available here: "
    ), done.stderr


def test_cli_profiles_chosen_adapters_and_compares_one_report(adapters_export_dir, tmp_path):
    out = tmp_path / "prof"
    done = edge_lora(
        "profile",
        adapters_export_dir,
        "--adapters",
        "small",
        "--threads",
        "1",
        "--prompt-lens",
        "8",
        "--new-tokens",
        "4",
        "--warmup-runs",
        "0",
        "--min-runs",
        "1",
        "--min-seconds",
        "0",
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "Adapters against the base model (on ÷ off)" in done.stdout and "| fp32 | small | CPU | 1 | 8 |" in done.stdout
    )
    assert [c["adapter"] for c in load_report(out / "profile.json").configurations] == [None, "small"]
    done = edge_lora("profile", "compare", out / "profile.json")
    assert done.returncode == 0 and "| fp32 | small | CPU | 1 | 8 |" in done.stdout, done.stderr


def test_cli_bad_input_exits_2_with_one_line(export_dir, adapters_export_dir, tmp_path):
    (tmp_path / "not-an-export").mkdir()
    cases = [
        ((tmp_path / "not-an-export",), "is not an export: no export.json — pass a dir written by edge-lora export"),
        ((tmp_path / "nowhere",), "nowhere does not exist — pass the --output dir of edge-lora export"),
        ((export_dir, "--device", "pi5"), 'unknown device profile "pi5": use one of android-phone, apple-silicon'),
        ((export_dir, "--adapters", "small"), "no export given is of flavor adapters"),
        ((adapters_export_dir, "--adapters", "small,nope"), "has no adapter 'nope' — its adapters: big, small"),
    ]
    for args, message in cases:
        done = edge_lora("profile", *args, "--out", tmp_path / "out")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (args, done.stderr)


def test_a_graph_onnxruntime_cannot_read_is_an_export_error(export_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    (broken / "model.onnx").write_bytes((export_dir / "model.onnx").read_bytes()[:200_000])
    manifest = json.loads((export_dir / "export.json").read_text())
    # the sha256 of the broken file, and no weight bytes: the export counts those, and it could not count these
    write_manifest(broken, "fp32", manifest["vocab_size"], manifest["eos_token_ids"][0], count_weights=False)
    with pytest.raises(ExportError, match=r"model.onnx cannot be loaded by onnxruntime .* re-run edge-lora export"):
        profile(broken, ProfileSettings(prompt_lens=(8,), new_tokens=4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"new_tokens": 1}, r"new_tokens=1 must be >= 2: the first token comes with prefill"),
        ({"threads": (2, -1)}, r"threads=\[2, -1\] must be one or more counts >= 0"),
        ({"prompt_lens": ()}, r"prompt_lens=\[\] must be one or more lengths >= 1"),
        ({"min_runs": 0, "min_seconds": -1.0}, r"min_runs=0 must be >= 1; min_seconds=-1.0 must be >= 0"),
        ({"providers": ()}, r"providers=\(\) is empty — name at least one"),
        (
            {"providers": (CPU, "CPUProvider")},
            r"providers 'CPUProvider' do not exist in onnxruntime — available here: .*CPU",
        ),
        ({"providers": (CPU, CPU)}, r"providers=\['CPUExecutionProvider', 'CPUExecutionProvider'\] names one twice"),
        ({"adapters": ()}, r"adapters=\[\] must name one or more adapters, each once"),
        ({"adapters": ("a", "a")}, r"adapters=\['a', 'a'\] must name one or more adapters, each once"),
    ],
)
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
        from edge_lora.runtime.profile.compare import compare
        from edge_lora.runtime.profile.sweep import ProfileSettings, profile
        from edge_lora.runtime.profile.report import write_report
        import edge_lora.runtime.profile.worker  # what each configuration's process imports
        report = profile({str(export_dir)!r}, ProfileSettings(prompt_lens=(4,), new_tokens=2, warmup_runs=0,
                                                              min_runs=1, min_seconds=0, trace=True))
        write_report(report, {str(tmp_path)!r})
        compare([report, report], 0.1)
        heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {HEAVY_MODULES!r}))
        print(json.dumps({{"heavy": heavy, "threads": report.configurations[0]["threads"],
                          "cores": psutil.cpu_count(logical=False)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    # threads 0 took the cpu-x86-64 profile's intra_op_threads = 0, resolved to one per physical core.
    assert out["threads"] == out["cores"]
