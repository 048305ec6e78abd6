"""Device profiles: every shipped profile loads, and each kind of bad file gets a one-line message that says
what was wrong and how to fix it; detect() describes this host."""

import dataclasses
import platform
import re
import tomllib
from pathlib import Path

import pytest

from edge_lora import devices

SHIPPED = [
    "android-phone",
    "apple-silicon",
    "arm64-a76",
    "cpu-x86-64",
    "intel-core-ultra",
    "jetson-orin",
    "nvidia-gpu",
    "snapdragon-htp",
]


def test_names_lists_the_eight_shipped_profiles():
    assert devices.names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads(name):
    profile = devices.load(name)
    assert profile.name == name
    assert profile.path.name == f"{name}.toml"
    assert all(isinstance(p, devices.Provider) for p in profile.providers)
    assert profile.providers[-1].name == "CPUExecutionProvider"  # every shipped profile can fall back to the CPU
    assert profile.bandwidth_gbs > 0 and profile.budget_mb > 0
    assert "\n" not in profile.bandwidth_source


def test_load_all_and_load_by_path_agree():
    profiles = devices.load_all()
    assert [p.name for p in profiles] == SHIPPED
    assert devices.load(str(profiles[0].path)) == profiles[0]


@pytest.mark.parametrize("name", SHIPPED)
def test_to_dict_gives_back_the_toml_document(name):
    profile = devices.load(name)
    assert profile.to_dict() == tomllib.loads(profile.path.read_text())


def _write(tmp_path: Path, name: str, replace: dict[str, str]) -> Path:
    """A copy of the cpu-x86-64 profile under tmp_path/name.toml with some lines replaced."""
    text = devices.load("cpu-x86-64").path.read_text().replace('name = "cpu-x86-64"', f'name = "{name}"')
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_malformed_toml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\n[runtime\nproviders = []\n')
    with pytest.raises(devices.DeviceProfileError, match=rf"^{re.escape(str(path))}: not valid TOML: .*line 2"):
        devices.load(path)


def _line(path: Path, text: str) -> int:
    """The number (from 1) of the line of path that starts with text."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(text))


def test_wrong_value_names_file_line_key_value_and_allowed_values(tmp_path):
    path = _write(tmp_path, "edge", {'precision = "int4"': 'precision = "int3"'})
    line = _line(path, "precision =")
    expected = f'{path}: line {line}: export.precision = "int3": expected one of "fp32", "fp16", "int8", "int4"'
    with pytest.raises(devices.DeviceProfileError, match=f"^{re.escape(expected)}$"):
        devices.load(str(path))


def test_all_problems_of_a_file_come_in_one_line(tmp_path):
    path = _write(
        tmp_path,
        "edge",
        {
            "opset = 18": "opset = 13",
            "budget_mb = 4096\n": "",
            "intra_op_threads = 0": "intra_op_thread = 0",
            "int4_accuracy_level = 4": "int4_accuracy_level = true",
        },
    )
    with pytest.raises(devices.DeviceProfileError) as caught:
        devices.load(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    for part in [
        f"line {_line(path, 'opset =')}: export.opset = 13: expected an integer from 14 to 21",
        f"{path}: runtime.intra_op_threads is missing",  # a missing key has no line
        "; memory.budget_mb is missing: add it, an integer > 0 (MiB)",
        f"line {_line(path, 'intra_op_thread =')}: unknown key runtime.intra_op_thread: remove it or fix its spelling",
        f"line {_line(path, 'int4_accuracy_level =')}: "
        "export.int4_accuracy_level = true: expected one of 0, 1, 2, 3, 4",
    ]:
        assert part in message
    assert message.count("; ") == 4


def test_name_must_match_the_file_name(tmp_path):
    path = _write(tmp_path, "edge", {'name = "edge"': 'name = "other"'})
    expected = 'name = "other": expected "edge", the file name without .toml'
    with pytest.raises(devices.DeviceProfileError, match=re.escape(expected)):
        devices.load(path)


def test_bad_provider_is_named_with_its_index(tmp_path):
    path = _write(
        tmp_path,
        "edge",
        {'{ name = "CPUExecutionProvider", options = {} }': '{ name = "CpuExecutionProvider", options = {} }'},
    )
    with pytest.raises(
        devices.DeviceProfileError,
        match=rf"line {_line(path, 'providers =')}: "
        r'runtime\.providers\[0\]\.name = "CpuExecutionProvider": expected one of .*CPUExecutionProvider',
    ):
        devices.load(path)


def test_key_lines_skip_multiline_strings(tmp_path):
    # "extra = 1" inside the notes string is text; the unknown key is the one set after it.
    path = _write(tmp_path, "edge", {"Decode is bound": "extra = 1\nDecode is bound"})
    path.write_text(path.read_text() + "extra = 2\n")
    with pytest.raises(devices.DeviceProfileError) as caught:
        devices.load(path)
    assert f"{path}: line {_line(path, 'extra = 2')}: unknown key notes.extra" in str(caught.value)


def test_unknown_name_lists_the_known_ones():
    known = r'unknown device profile "pi5": use one of android-phone, apple-silicon, .*, snapdragon-htp, or the path'
    with pytest.raises(devices.DeviceProfileError, match=known):
        devices.load("pi5")


def test_missing_file_says_so(tmp_path):
    with pytest.raises(devices.DeviceProfileError, match=r"missing\.toml: no such file"):
        devices.load(tmp_path / "missing.toml")


def test_replace_cannot_build_an_invalid_profile():
    expected = 'export.flavor = "lora": expected one of "merged", "adapters"'
    with pytest.raises(devices.DeviceProfileError, match=re.escape(expected)):
        dataclasses.replace(devices.load("cpu-x86-64"), flavor="lora")


def test_resolve_threads():
    profile = devices.load("cpu-x86-64")
    assert profile.intra_op_threads == 0
    assert devices.resolve_threads(profile, 6) == 6
    assert devices.resolve_threads(devices.load("snapdragon-htp"), 6) == 4


def _host(arch: str, os: str, providers: list[str]) -> devices.HostInfo:
    return devices.HostInfo("cpu", arch, (), 4, 4, 8192, os, tuple(providers), 10.0, "")


@pytest.mark.parametrize(
    ("arch", "os", "providers", "expected"),
    [
        ("x86_64", "Linux 6.8", ["CUDAExecutionProvider", "CPUExecutionProvider"], "nvidia-gpu"),
        ("aarch64", "Linux 5.15", ["TensorrtExecutionProvider", "CPUExecutionProvider"], "jetson-orin"),
        ("x86_64", "Windows 11", ["OpenVINOExecutionProvider", "CPUExecutionProvider"], "intel-core-ultra"),
        ("aarch64", "Android 14", ["QNNExecutionProvider", "CPUExecutionProvider"], "snapdragon-htp"),
        ("aarch64", "Darwin 24.1", ["CPUExecutionProvider"], "apple-silicon"),
        ("aarch64", "Android 14", ["XnnpackExecutionProvider", "CPUExecutionProvider"], "android-phone"),
        ("aarch64", "Linux 6.6", ["CPUExecutionProvider"], "arm64-a76"),
        ("x86_64", "Linux 6.8", ["CPUExecutionProvider"], "cpu-x86-64"),
    ],
)
def test_closest(arch, os, providers, expected):
    assert devices.closest(_host(arch, os, providers)) == expected


@pytest.fixture(scope="module")
def host() -> devices.HostInfo:
    return devices.detect(["CPUExecutionProvider"])  # measuring bandwidth takes about a second; do it once


def test_detect_describes_this_host(host):
    assert host.physical_cores >= 1 and host.logical_cores >= host.physical_cores
    assert host.memory_mb > 0
    assert host.measured_bandwidth_gbs > 0
    assert host.cpu_model and host.os
    assert host.available_providers == ("CPUExecutionProvider",)
    assert host.closest_profile in SHIPPED
    reported = {"avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx", "neon", "dotprod", "i8mm", "sve"}
    assert set(host.cpu_flags) <= reported


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="expects the x86-64 profile")
def test_detect_picks_cpu_profile_on_x86_64(host):
    assert host.arch == "x86_64"
    assert host.closest_profile == "cpu-x86-64"
