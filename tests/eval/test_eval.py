"""Evaluation: intervals on known cases, metrics, an export and an adapter on the same samples, the regression
gate, and every bad input as one line with exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_lora.eval import metrics, stats
from edge_lora.eval.run import EvalSettings, evaluate


def edge_lora(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (the session's fixtures are loaded once): exit status, stdout, stderr."""
    from edge_lora.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- statistics and metrics on known cases


def test_wilson_interval_known_values():
    low, high = stats.wilson(8, 10)  # (p + z²/2n ± z √(p(1-p)/n + z²/4n²)) / (1 + z²/n), worked by hand
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert stats.wilson(0, 10)[0] == 0.0 and round(stats.wilson(0, 10)[1], 4) == 0.2775
    assert stats.wilson(10, 10)[1] == pytest.approx(1.0) and round(stats.wilson(10, 10)[0], 4) == 0.7225


def test_sign_test_is_mcnemar_exact():
    assert stats.sign_test(0, 0) == 1.0
    assert stats.sign_test(5, 5) == 1.0
    assert stats.sign_test(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert stats.sign_test(0, 10) == pytest.approx(2 / 1024)


def test_bootstrap_interval_of_a_mean_matches_the_normal_one():
    values = np.random.default_rng(3).normal(5.0, 2.0, 400)
    low, high = stats.bootstrap((values,), lambda s, n: s / n)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.03) and high == pytest.approx(
        values.mean() + half, abs=0.03
    )


def test_scorers():
    assert metrics.exact(" 17.03.2024", "17.03.2024 ") == 1.0 and metrics.exact("17.03.2025", "17.03.2024") == 0.0
    assert metrics.contains("it is 17.03.2024.", " 17.03.2024") == 1.0
    assert metrics.token_f1("17 03 2025", "17.03.2024") == pytest.approx(2 / 3)
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("x", "") == 0.0
    uniform = np.zeros((3, 8), dtype=np.float32)
    assert metrics.nll(uniform, [1, 2, 3]) == pytest.approx(3 * np.log(8))


# ---- targets


@pytest.fixture(scope="session")
def weak_adapter(workdir, base_dir, task_files) -> Path:
    """An adapter known to be worse: the same recipe stopped after 5 steps."""
    from edge_lora.train.config import TrainConfig
    from edge_lora.train.loop import train

    train_path, _ = task_files
    config = TrainConfig(
        model=str(base_dir),
        data=str(train_path),
        output=str(workdir / "adapter-weak"),
        max_steps=5,
        batch_size=16,
        learning_rate=2e-3,
    )
    return train(config, show_progress=False)


def test_export_exact_match_with_interval_and_latency(export_fp32, task_files):
    report = evaluate(export_fp32, [task_files[1]], EvalSettings(metric="exact"), show_progress=False)
    (file,) = report.files
    parity = json.loads((export_fp32 / "export.json").read_text())["parity"]["merged"]["task_accuracy"]
    assert file.summary.samples == 16 and file.summary.value == parity["onnx"]
    correct = int(sum(s.score for s in file.samples))
    assert (file.summary.ci_low, file.summary.ci_high) == stats.wilson(correct, 16)
    assert file.summary.ci_low <= file.summary.value <= file.summary.ci_high
    assert all(s.latency_s > 0 and s.output is not None for s in file.samples)
    assert file.samples[0].where == f"{task_files[1]}:1"


def test_perplexity_of_an_export_equals_the_trained_model(export_fp32, adapter_dir, task_files):
    """The hand-off: the PyTorch reference (4-bit base + adapter) and its fp32 export agree on perplexity."""
    settings = EvalSettings(metric="perplexity")
    onnx = evaluate(export_fp32, [task_files[1]], settings, show_progress=False).files[0]
    torch = evaluate(adapter_dir, [task_files[1]], settings, show_progress=False).files[0]
    assert 1.0 <= onnx.summary.value < 128  # the vocabulary's size is a uniform guess's perplexity
    assert onnx.summary.value == pytest.approx(torch.summary.value, rel=1e-3)
    assert [s.tokens for s in onnx.samples] == [s.tokens for s in torch.samples]
    assert onnx.summary.ci_low <= onnx.summary.value <= onnx.summary.ci_high
    assert "bootstrap" in onnx.summary.ci_method


def test_cli_several_files_one_row_each(capsys, export_int4, task_files, tmp_path):
    subset = tmp_path / "first4.jsonl"
    subset.write_text("".join(task_files[1].read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "samples.jsonl"
    code, stdout, err = edge_lora(
        capsys,
        "eval",
        export_int4,
        "--data",
        task_files[1],
        "--data",
        subset,
        "--metric",
        "token-f1",
        "--out",
        out,
        "--quiet",
    )
    assert code == 0, err
    rows = [line for line in stdout.splitlines() if line.startswith((str(task_files[1]), str(subset)))]
    assert len(rows) == 2 and "percentile bootstrap" in rows[0]
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) == 20 and {s["data"] for s in samples} == {str(task_files[1]), str(subset)}
    assert all(0 <= s["score"] <= 1 and s["latency_s"] > 0 for s in samples)


def test_messages_records_use_the_chat_template(export_fp32, task_files, tmp_path, eval_samples):
    """The last assistant turn is the reference; a template that renders the user turn as the prompt gives the
    same result as the prompt/completion records."""
    target = tmp_path / "export"
    shutil.copytree(export_fp32, target)
    (target / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": s["prompt"]},
                        {"role": "assistant", "content": s["completion"]},
                    ]
                }
            )
            + "\n"
            for s in eval_samples
        )
    )
    settings = EvalSettings(metric="exact")
    as_chat = evaluate(target, [chats], settings, show_progress=False).files[0]
    as_prompts = evaluate(target, [task_files[1]], settings, show_progress=False).files[0]
    assert [s.output for s in as_chat.samples] == [s.output for s in as_prompts.samples]


# ---- the regression gate


def test_gate_passes_the_same_target_twice_and_int4_against_fp32(
    capsys, export_fp32, export_int4, task_files, tmp_path
):
    code, stdout, err = edge_lora(
        capsys,
        "eval",
        "compare",
        export_fp32,
        export_fp32,
        "--data",
        task_files[1],
        "--fail-if-worse",
        "0",
        "--out",
        tmp_path / "same.jsonl",
        "--quiet",
    )
    assert code == 0, err
    assert "0/0/16" in stdout and "1 (McNemar exact)" in stdout and "pass" in stdout
    code, stdout, err = edge_lora(
        capsys,
        "eval",
        "compare",
        export_fp32,
        export_int4,
        "--data",
        task_files[1],
        "--fail-if-worse",
        "2",
        "--out",
        tmp_path / "int4.jsonl",
        "--quiet",
    )
    assert code == 0, stdout + err


def test_gate_fails_an_adapter_known_to_be_worse(capsys, adapter_dir, weak_adapter, task_files, tmp_path):
    """Two adapter versions in PyTorch; perplexity, because the session's short training run is not yet exact."""
    code, stdout, err = edge_lora(
        capsys,
        "eval",
        "compare",
        adapter_dir,
        weak_adapter,
        "--data",
        task_files[1],
        "--metric",
        "perplexity",
        "--fail-if-worse",
        "0.5",
        "--out",
        tmp_path / "gate.jsonl",
        "--quiet",
    )
    assert code == 1, stdout + err
    assert "0/16/0" in stdout and "(sign test)" in stdout and "WORSE" in stdout
    assert "NEW is worse than OLD beyond the margin of 0.5" in stdout
    rows = [json.loads(line) for line in (tmp_path / "gate.jsonl").read_text().splitlines()]
    assert {r["target"] for r in rows} == {str(adapter_dir), str(weak_adapter)} and len(rows) == 32


def test_gate_needs_significance_as_well_as_the_margin():
    """A drop beyond the margin on too few samples to tell passes; the same drop on many samples fails."""
    from edge_lora.eval.compare import pair
    from edge_lora.eval.run import SampleResult

    def results(scores):
        return [SampleResult(f"d:{i}", "", "", "", float(s), 0.01) for i, s in enumerate(scores)]

    few = pair("d", results([1, 1, 1, 1]), results([1, 1, 0, 0]), "exact", margin=5)  # -50 points, p = 0.5
    assert few.drop_points == 50 and few.p_value == 0.5 and not few.worse_beyond_margin
    many = pair("d", results([1] * 40), results([1] * 30 + [0] * 10), "exact", margin=5)  # -25 points, p = 0.002
    assert many.worse_beyond_margin
    within = pair("d", results([1] * 40), results([1] * 30 + [0] * 10), "exact", margin=30)
    assert not within.worse_beyond_margin


# ---- bad input: one line, exit 2


def test_eval_file_with_wrong_fields(capsys, export_fp32, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "2024-03-17 ->", "completion": " 17.03.2024"}\n{"question": "when?"}\n')
    one_line_error(*edge_lora(capsys, "eval", export_fp32, "--data", data)[::2], f"{data} line 2", "no known fields")


def test_text_records_fit_perplexity_only(capsys, export_fp32, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text('{"text": "2024-03-17 -> 17.03.2024"}\n')
    one_line_error(
        *edge_lora(capsys, "eval", export_fp32, "--data", data, "--metric", "exact")[::2],
        f"{data}:1",
        "use --metric perplexity",
    )


def test_perplexity_of_an_export_without_logits(capsys, export_fp32, task_files, tmp_path):
    target = tmp_path / "no-logits"
    shutil.copytree(export_fp32, target)
    manifest = json.loads((target / "export.json").read_text())
    manifest["outputs"] = [o for o in manifest["outputs"] if o["name"] != "logits"]
    (target / "export.json").write_text(json.dumps(manifest))
    one_line_error(
        *edge_lora(capsys, "eval", target, "--data", task_files[1], "--metric", "perplexity")[::2],
        "has no 'logits' output",
        "use a generation metric",
    )


def test_compare_targets_with_different_tokenizers(capsys, export_fp32, task_files, tmp_path):
    from edge_lora.runtime.package import sha256_file

    other = tmp_path / "other-tokenizer"
    shutil.copytree(export_fp32, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    manifest = json.loads((other / "export.json").read_text())
    manifest["files"]["tokenizer.json"] = sha256_file(other / "tokenizer.json")  # a valid export, another tokenizer
    (other / "export.json").write_text(json.dumps(manifest))
    one_line_error(
        *edge_lora(capsys, "eval", "compare", export_fp32, other, "--data", task_files[1])[::2],
        "have different tokenizers",
        "compare targets built on the same base model",
    )


def test_target_that_is_neither(capsys, tmp_path, task_files):
    one_line_error(
        *edge_lora(capsys, "eval", tmp_path, "--data", task_files[1])[::2],
        "neither an export dir (export.json) nor an adapter dir (edge_lora.json)",
    )


def test_adapter_option_on_an_adapter_dir(capsys, adapter_dir, task_files):
    one_line_error(
        *edge_lora(capsys, "eval", adapter_dir, "--adapter", "x", "--data", task_files[1])[::2],
        "--adapter x applies to an export of flavor adapters",
    )


def test_unknown_metric_and_bad_margin(capsys, export_fp32, task_files):
    one_line_error(
        *edge_lora(capsys, "eval", export_fp32, "--data", task_files[1], "--metric", "bleu")[::2],
        "'bleu' is not one of",
    )
    one_line_error(
        *edge_lora(
            capsys, "eval", "compare", export_fp32, export_fp32, "--data", task_files[1], "--fail-if-worse", "-1"
        )[::2],
        "--fail-if-worse -1.0 must be a number of points >= 0",
    )


def test_every_new_command_has_help_with_an_example():
    from click.testing import CliRunner

    from edge_lora.cli import cli

    for command in (["eval"], ["eval", "target"], ["eval", "compare"], ["inspect"]):
        result = CliRunner().invoke(cli, [*command, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output, result.output
