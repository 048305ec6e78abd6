"""Data checks at train time: the data card, planted duplicates and a planted train/eval overlap."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_lora.demo.task import date_samples, write_jsonl
from edge_lora.errors import UsageError
from edge_lora.train.config import TrainConfig
from edge_lora.train.datacheck import OverlapError, check_data, near_pairs, normalise, percentiles

SENTENCE = "The adapter dir is loadable by PeftModel.from_pretrained unchanged and records its base fingerprint"


def card_of(config: TrainConfig, lengths: list[int] | None = None, truncated: int = 0) -> dict:
    """check_data with stand-ins for what load_examples returns (token lengths, a report): no tokenizer needed."""
    n = sum(1 for line in Path(config.data).read_text().splitlines() if line.strip())
    examples = [SimpleNamespace(input_ids=[0] * k) for k in (lengths or [8] * n)]
    return check_data(config, examples, SimpleNamespace(sha256="0" * 64, truncated=truncated))


@pytest.fixture()
def task(tmp_path) -> tuple[list[dict], list[dict]]:
    train = date_samples(300, seed=0)
    held = date_samples(40, seed=1, exclude=frozenset(s["prompt"][:10] for s in train))
    return train, held


def write(tmp_path: Path, train: list[dict], held: list[dict]) -> tuple[Path, Path]:
    return write_jsonl(train, tmp_path / "train.jsonl"), write_jsonl(held, tmp_path / "eval.jsonl")


def test_clean_task_has_an_empty_card(tmp_path, task):
    train_path, eval_path = write(tmp_path, *task)
    card = card_of(TrainConfig(model="m", data=str(train_path), eval_data=str(eval_path)))
    assert card["train"]["samples"] == 300 and card["eval"]["samples"] == 40
    assert card["train"]["exact_duplicates"]["count"] == 0
    # dates a day apart share most characters (Jaccard ~0.3) but are different samples
    assert card["train"]["near_duplicates"]["count"] == 0
    assert card["overlap"]["count"] == 0


def test_planted_overlap_stops_training_naming_the_lines(tmp_path, task):
    train, held = task
    held[3] = dict(train[17])  # exact copy: eval.jsonl:4 = train.jsonl:18
    held[9] = {
        "prompt": train[50]["prompt"] + " ",
        "completion": train[50]["completion"].upper(),
    }  # same once normalised
    train_path, eval_path = write(tmp_path, train, held)
    config = TrainConfig(model="m", data=str(train_path), eval_data=str(eval_path))
    with pytest.raises(OverlapError, match=r"2 of 40 eval samples \(5\.0%\) duplicate training samples") as caught:
        card_of(config)
    message = str(caught.value)
    assert f"{eval_path}:4 = {train_path}:18" in message and f"{eval_path}:10 = {train_path}:51" in message
    assert "--allow-overlap" in message and "\n" not in message
    allowed = card_of(TrainConfig(model="m", data=str(train_path), eval_data=str(eval_path), allow_overlap=True))
    assert allowed["overlap"]["count"] == 2 and allowed["overlap"]["allowed"]
    # max_overlap is the fraction that may overlap: 5% passes a 10% limit
    assert (
        card_of(TrainConfig(model="m", data=str(train_path), eval_data=str(eval_path), max_overlap=0.1))["overlap"][
            "count"
        ]
        == 2
    )


def test_planted_near_duplicates_are_found(tmp_path, task):
    train, held = task
    train[120] = {"prompt": SENTENCE, "completion": " yes"}
    train[250] = {"prompt": SENTENCE.replace("loadable", "readable"), "completion": " yes"}  # Jaccard 0.89
    held[5] = {"prompt": SENTENCE.replace("records", "keeps"), "completion": " yes"}  # 0.83
    train_path, eval_path = write(tmp_path, train, held)
    card = card_of(TrainConfig(model="m", data=str(train_path), eval_data=str(eval_path), allow_overlap=True))
    near = card["train"]["near_duplicates"]
    assert near["count"] == 1 and near["examples"][0].startswith(f"{train_path}:251 ~ {train_path}:121 (0.")
    assert card["overlap"]["near"] == 1 and card["overlap"]["examples"][0].startswith(
        f"{eval_path}:6 ~ {train_path}:121"
    )
    # a stricter threshold lets the edited sentence through
    strict = card_of(
        TrainConfig(model="m", data=str(train_path), eval_data=str(eval_path), near_duplicate_jaccard=0.99)
    )
    assert strict["train"]["near_duplicates"]["count"] == 0 and strict["overlap"]["count"] == 0


def test_exact_duplicates_and_lengths(tmp_path, task):
    train, held = task
    train[7] = dict(train[2])
    train[8] = dict(train[2])
    train_path, _ = write(tmp_path, train, held)
    card = card_of(TrainConfig(model="m", data=str(train_path)), lengths=list(range(1, 301)), truncated=3)
    duplicates = card["train"]["exact_duplicates"]
    assert duplicates["count"] == 2 and duplicates["examples"] == [
        f"{train_path}:8 = {train_path}:3",
        f"{train_path}:9 = {train_path}:3",
    ]
    assert card["train"]["tokens"] == {"min": 1, "p50": 150, "p90": 270, "max": 300} and card["train"]["truncated"] == 3
    assert card["eval"] is None and card["overlap"] is None


def test_near_pairs_on_many_samples():
    """The index is linear: 5000 distinct sentences, two planted pairs, and nothing else reported."""
    import random

    import numpy as np

    rng = random.Random(0)
    vocabulary = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(2000)
    ]
    texts = [normalise(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(10, 40)))) for _ in range(5000)]
    texts[4000] = texts[10] + " extra"
    texts[4999] = "tiny"
    texts[4998] = "tiny"  # shorter than a shingle: one shingle of its own
    found = {(a, b) for a, b, _ in near_pairs(texts, np.zeros(len(texts), dtype=bool), 0.8)}
    assert found == {(10, 4000), (4998, 4999)}


def test_percentiles_are_nearest_rank():
    assert percentiles([5]) == {"min": 5, "p50": 5, "p90": 5, "max": 5}
    assert percentiles([4, 1, 3, 2]) == {"min": 1, "p50": 2, "p90": 4, "max": 4}


def test_bad_eval_record_names_file_and_line(tmp_path, task):
    train, held = task
    train_path, eval_path = write(tmp_path, train, held)
    eval_path.write_text(eval_path.read_text() + json.dumps({"question": "?"}) + "\n")
    with pytest.raises(UsageError, match=rf"{eval_path} line 41: no known fields \(got question\)"):
        card_of(TrainConfig(model="m", data=str(train_path), eval_data=str(eval_path)))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_overlap", 1.5, r"max_overlap=1.5 must be a fraction in \[0, 1\]"),
        ("near_duplicate_jaccard", 0.0, r"near_duplicate_jaccard=0.0 must be in \(0, 1\]"),
    ],
)
def test_bad_thresholds(field, value, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig(model="m", data="d.jsonl", **{field: value})


def test_overlap_stops_train_before_any_model_loads(base_dir, tmp_path, task):
    """Through train() and the CLI flag: exit 2 with one line, and no output dir (nothing was loaded or written)."""
    import subprocess
    import sys

    train, held = task
    held[0] = dict(train[0])
    train_path, eval_path = write(tmp_path, train, held)
    out = tmp_path / "adapter"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_lora",
            "train",
            "--model",
            str(base_dir),
            "--data",
            str(train_path),
            "--eval-data",
            str(eval_path),
            "--output",
            str(out),
            "--max-steps",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{eval_path}:1 = {train_path}:1" in lines[0]
    assert not out.exists()


def test_the_trained_adapter_carries_its_data_card(adapter_dir, task_files):
    manifest = json.loads((adapter_dir / "edge_lora.json").read_text())
    card = manifest["data_card"]
    assert card["train"]["samples"] == 256 and card["train"]["sha256"] == manifest["data"]["train"]["sha256"]
    assert card["train"]["tokens"]["max"] <= manifest["training"]["max_length"]
    assert card["eval"]["samples"] == 16 and card["overlap"]["count"] == 0 and card["seconds"] >= 0
