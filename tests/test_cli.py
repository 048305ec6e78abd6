"""The command line: every command of the contract has --help with an example; bad input is one line, exit 2."""

import json
import subprocess
import sys

import pytest

COMMANDS = [
    ["demo"],
    ["base"],
    ["base", "from-gguf"],
    ["train"],
    ["export"],
    ["run"],
    ["serve"],
    ["profile"],
    ["profile", "measure"],
    ["profile", "compare"],
    ["eval"],
    ["devices"],
    ["devices", "list"],
    ["devices", "show"],
    ["devices", "detect"],
]


def edge_lora(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "edge_lora", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(done, *fragments):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    from click.testing import CliRunner

    from edge_lora.cli import cli

    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    if command not in (["devices", "list"], ["devices", "detect"]):
        assert "Example:" in result.output


def test_wrong_flag():
    assert_one_line_error(edge_lora("train", "--bogus"), "No such option '--bogus'", "edge-lora train --help")


def test_missing_model_dir(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    done = edge_lora("train", "--model", tmp_path / "nope", "--data", data, "--output", tmp_path / "out")
    assert_one_line_error(done, "does not exist", "nope")


def test_model_dir_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    done = edge_lora("train", "--model", tmp_path / "m", "--data", tmp_path / "d.jsonl")
    assert_one_line_error(done, "has no weights")


def test_unreadable_data_file(base_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\xff\xfe not utf-8\n")
    done = edge_lora("train", "--model", base_dir, "--data", data, "--output", tmp_path / "out")
    assert_one_line_error(done, str(data), "cannot be read", "UTF-8")


def test_serve_and_compare_name_what_is_missing(tmp_path):
    assert_one_line_error(edge_lora("serve", tmp_path), "is not an export", "edge-lora export")
    assert_one_line_error(edge_lora("profile", "compare", "a.json", "b.json"), "a.json does not exist")


def test_unknown_device():
    assert_one_line_error(edge_lora("devices", "show", "toaster"), "toaster", "cpu-x86-64")


def test_run_on_an_export_and_bad_export_dir(export_fp32, tmp_path):
    done = edge_lora("run", export_fp32, "--prompt", "2024-03-17 ->", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    assert_one_line_error(edge_lora("run", tmp_path, "--prompt", "x"), "is not an export")


def test_export_refuses_missing_adapter(tmp_path):
    assert_one_line_error(edge_lora("export", tmp_path / "none", "--output", tmp_path / "o"), "does not exist")


def test_devices_detect_names_a_profile():
    done = edge_lora("devices", "detect")
    assert done.returncode == 0, done.stderr
    host = json.loads(done.stdout)
    assert host["closest_profile"] and host["logical_cores"] >= 1
