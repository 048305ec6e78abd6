"""What a device profile's TOML file must hold: its keys, the values they allow, the check of a document against
them, and the line of the file that sets each key, for the error message.

The keys a profile must have and the values they allow are listed once, in ``SCHEMA``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from edge_lora.formats import KERNELS, Flavor, Graph, Precision

GraphOptimization = Literal["disable", "basic", "extended", "all"]

# onnxruntime.get_all_providers() of onnxruntime 1.32, so that a misspelt name fails when the profile loads
# rather than when a session is built on the device.
KNOWN_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider",
    "DnnlExecutionProvider",
    "VitisAIExecutionProvider",
    "QNNExecutionProvider",
    "NnapiExecutionProvider",
    "VSINPUExecutionProvider",
    "JsExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "RknpuExecutionProvider",
    "WebNNExecutionProvider",
    "WebGpuExecutionProvider",
    "XnnpackExecutionProvider",
    "CANNExecutionProvider",
    "AzureExecutionProvider",
    "CPUExecutionProvider",
)

# edge-lora's own onnxruntime kernels (edge_lora.runtime.kernels) that a profile may allow.


class DeviceProfileError(ValueError):
    """A device profile that cannot be found, read or validated; the message is one line."""


def show(value: object) -> str:
    """A value as TOML-like text for messages ("int3", true, 4)."""
    return json.dumps(value, default=str)


def _one_of(allowed: tuple) -> tuple[str, Callable[[object], bool]]:
    # Comparing types as well keeps true from passing as 1.
    expected = "one of " + ", ".join(map(show, allowed))
    return expected, lambda v: type(v) is type(allowed[0]) and v in allowed


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


_TEXT = ("a non-empty string", _is_text)

# DeviceProfile field -> (its key in the TOML file, what a valid value looks like, the test of one).
# The order is the dataclass's and the file's.
SCHEMA: dict[str, tuple[str, str, Callable[[object], bool]]] = {
    "name": ("name", *_TEXT),
    "description": ("description", *_TEXT),
    "providers": (
        "runtime.providers",
        'a non-empty list of tables like { name = "CPUExecutionProvider", options = {} }, highest priority first',
        lambda v: isinstance(v, list) and v != [] and all(isinstance(entry, dict) for entry in v),
    ),
    "intra_op_threads": (
        "runtime.intra_op_threads",
        "an integer >= 0 (0: one thread per physical core)",
        lambda v: _is_int(v) and v >= 0,
    ),
    "graph_optimization": ("runtime.graph_optimization", *_one_of(get_args(GraphOptimization))),
    "kernels": (
        "runtime.kernels",
        f"a list of edge-lora kernels, each one of {', '.join(KERNELS)} (or [])",
        lambda v: isinstance(v, list) and all(k in KERNELS for k in v),
    ),
    "precision": ("export.precision", *_one_of(get_args(Precision))),
    "flavor": ("export.flavor", *_one_of(get_args(Flavor))),
    "opset": ("export.opset", "an integer from 14 to 21", lambda v: _is_int(v) and 14 <= v <= 21),
    "graph": ("export.graph", *_one_of(get_args(Graph))),
    "int4_block_size": ("export.int4_block_size", *_one_of((16, 32, 64, 128))),
    "int4_accuracy_level": ("export.int4_accuracy_level", *_one_of((0, 1, 2, 3, 4))),
    "budget_mb": ("memory.budget_mb", "an integer > 0 (MiB)", lambda v: _is_int(v) and v > 0),
    "bandwidth_gbs": (
        "memory.bandwidth_gbs",
        "a number > 0 (GB/s)",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
    ),
    "bandwidth_source": ("memory.bandwidth_source", *_TEXT),
    "notes": ("notes.text", *_TEXT),
}

MISSING = object()
OPTIONAL = {"runtime.kernels": []}  # keys a profile may leave out, with the value they then take


def get(doc: dict, key: str) -> object:
    """The value at a dotted key ("export.precision") of a TOML document, else MISSING."""
    for part in key.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return MISSING
        doc = doc[part]
    return doc


def problems(doc: dict, path: Path) -> list[tuple[str, str]]:
    """Every problem with a profile's TOML document as (its key, a message naming the key, the value and what is
    allowed)."""
    found = []
    for key, expected, ok in SCHEMA.values():
        value = get(doc, key)
        if value is MISSING and key in OPTIONAL:
            continue
        if value is MISSING:
            found.append((key, f"{key} is missing: add it, {expected}"))
        elif not ok(value):
            found.append((key, f"{key} = {show(value)}: expected {expected}"))
        elif key == "runtime.providers":
            found += [(key, problem) for problem in _provider_problems(key, value)]
    name = doc.get("name")
    if _is_text(name) and name != path.stem:
        found.append(("name", f"name = {show(name)}: expected {show(path.stem)}, the file name without .toml"))
    return found + _unknown_keys(doc)


def _provider_problems(key: str, providers: list[dict]) -> list[str]:
    found, seen = [], set()
    for i, entry in enumerate(providers):
        where = f"{key}[{i}]"
        if set(entry) != {"name", "options"}:
            found.append(f"{where} = {show(entry)}: expected exactly the keys name and options")
            continue
        name, options = entry["name"], entry["options"]
        if name not in KNOWN_PROVIDERS:
            found.append(f"{where}.name = {show(name)}: expected one of {', '.join(KNOWN_PROVIDERS)}")
        elif name in seen:
            found.append(f"{where}.name = {show(name)}: listed twice; keep one entry per provider")
        seen.add(name)
        if not isinstance(options, dict) or not all(
            isinstance(option, (str, int, float, bool)) for option in options.values()
        ):
            found.append(
                f"{where}.options = {show(options)}: expected a table of string, integer, float or boolean values"
            )
    return found


def _unknown_keys(doc: dict) -> list[tuple[str, str]]:
    """Keys the schema does not have, usually misspellings that would otherwise be ignored."""
    keys = [key for key, _, _ in SCHEMA.values()]
    sections = list(dict.fromkeys(key.partition(".")[0] for key in keys if "." in key))
    found = []
    for top, value in doc.items():
        if top in sections and not isinstance(value, dict):
            found.append((top, f"{top} = {show(value)}: expected a table [{top}]"))
            continue
        for key in [f"{top}.{sub}" for sub in value] if top in sections else [top]:
            if key not in keys:
                section = key.rpartition(".")[0]
                known = [k for k in keys if k.rpartition(".")[0] == section]
                known += [] if section else [f"[{s}]" for s in sections]
                message = f"unknown key {key}: remove it or fix its spelling (known here: {', '.join(known)})"
                found.append((key, message))
    return found


def error(path: Path, found: list[tuple[str, str]], lines: dict[str, int] | None = None) -> DeviceProfileError:
    """One line: the file, then each problem, after the line of the file that sets its key where that is known."""
    lines = lines or {}
    return DeviceProfileError(
        f"{path}: " + "; ".join(f"line {lines[key]}: {message}" if key in lines else message for key, message in found)
    )


_TABLE_LINE = re.compile(r"\[\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")
_KEY_LINE = re.compile(r"([A-Za-z0-9_-]+)\s*=")
_MULTILINE_STRINGS = ("'''", '"""')


def key_lines(text: str) -> dict[str, int]:
    """The line (from 1) that sets each key of a profile's TOML text: {"name": 1, "export.precision": 12, ...}.

    tomllib gives values without their positions, so the lines are found in the text: a [table] header opens a
    section, and a line that starts "key =" sets section.key. The lines of a multi-line string are skipped, so
    that notes text such as "threads = 4" does not pass for a key.
    """
    lines: dict[str, int] = {}
    section, closing = "", None  # closing: the quotes that end the multi-line string being skipped
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if closing is not None:
            closing = None if closing in stripped else closing
            continue
        if table := _TABLE_LINE.match(stripped):
            section = table[1]
        elif key := _KEY_LINE.match(stripped):
            lines.setdefault(f"{section}.{key[1]}" if section else key[1], number)
            value = stripped[key.end() :].strip()
            if value[:3] in _MULTILINE_STRINGS and value[:3] not in value[3:]:
                closing = value[:3]
    return lines
