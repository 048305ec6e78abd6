"""Data loading, its error messages, and packing without leaks across samples."""

import json

import pytest

from edge_lora.errors import UsageError
from edge_lora.train.config import LoraConfig, TrainConfig, load_toml
from edge_lora.train.data import IGNORE_INDEX, load_examples, pack


@pytest.fixture(scope="module")
def tokenizer():
    from edge_lora.tiny import char_tokenizer

    return char_tokenizer()


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_completion_masks_the_prompt(tmp_path, tokenizer):
    path = write(tmp_path, [json.dumps({"prompt": "ab", "completion": "cd"})])
    (example,), report = load_examples(path, tokenizer, 64, train_on_prompt=False)
    # <s> a b | c d </s>: loss only on the completion and the end-of-sequence token
    assert len(example.input_ids) == 6
    assert example.labels[:3] == (IGNORE_INDEX,) * 3
    assert example.labels[3:] == example.input_ids[3:]
    assert report.samples == 1 and report.loss_tokens == 3 and report.truncated == 0


def test_text_records_and_truncation_are_counted(tmp_path, tokenizer):
    path = write(tmp_path, [json.dumps({"text": "x" * 20}), json.dumps({"text": "short"})])
    examples, report = load_examples(path, tokenizer, 10, train_on_prompt=False)
    assert [len(e.input_ids) for e in examples] == [10, 7]
    assert report.truncated == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "completion": null}', r'line 2: expected a "completion" string, got null'),
        ("not json", r"line 2: not valid JSON"),
        ('["a"]', r"line 2: expected a JSON object, got list"),
        ('{"question": "a"}', r"line 2: no known fields \(got question\)"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', r"with an assistant turn"),
    ],
)
def test_bad_lines_are_named(tmp_path, tokenizer, line, message):
    path = write(tmp_path, [json.dumps({"prompt": "a", "completion": "b"}), line])
    with pytest.raises(UsageError, match=message):
        load_examples(path, tokenizer, 64, train_on_prompt=False)


def test_missing_and_empty_files(tmp_path, tokenizer):
    with pytest.raises(UsageError, match=r"does not exist — pass a JSONL file"):
        load_examples(tmp_path / "nope.jsonl", tokenizer, 64, False)
    with pytest.raises(UsageError, match=r"holds no samples"):
        load_examples(write(tmp_path, [""]), tokenizer, 64, False)


def test_no_completion_left_after_truncation(tmp_path, tokenizer):
    path = write(tmp_path, [json.dumps({"prompt": "a" * 30, "completion": "b"})])
    with pytest.raises(UsageError, match=r"line 1: no completion tokens left after truncation to max_length=8"):
        load_examples(path, tokenizer, 8, False)


def test_config_collects_every_problem():
    with pytest.raises(UsageError, match=r"max_steps=0 must be a positive integer; learning_rate=-1 must be positive"):
        TrainConfig(model="m", data="d", max_steps=0, learning_rate=-1)
    with pytest.raises(UsageError, match=r"lora.r=0 must be a positive integer"):
        LoraConfig(r=0)


def test_toml_config_with_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "m"\ndata = "d"\nmax_steps = 5\n[lora]\nr = 4\ntarget_modules = ["q_proj"]\n')
    config = load_toml(path, {"max_steps": 7, "data": None})
    assert (config.max_steps, config.data, config.lora.r, config.lora.target_modules) == (7, "d", 4, ("q_proj",))
    path.write_text('model = "m"\ndata = "d"\nmax_stepz = 5\n')
    with pytest.raises(UsageError, match=r"unknown key\(s\) max_stepz"):
        load_toml(path, {})


def test_packed_loss_equals_unpacked_loss(tmp_path, tokenizer):
    """Positions restart per sample and the mask is block-diagonal: packing changes nothing in the loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from edge_lora.tiny import llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    lines = [json.dumps({"prompt": "p" * n, "completion": "c" * (9 - n)}) for n in range(1, 7)]
    examples, _ = load_examples(write(tmp_path, lines), tokenizer, 64, False)
    with torch.no_grad():
        packed = pack(examples, 32, tokenizer.pad_token_id)
        assert packed["input_ids"].shape[0] < len(examples)  # several samples share a row
        packed_loss = model(**packed, use_cache=False).loss
        total, count = 0.0, 0
        for e in examples:
            n = sum(1 for t in e.labels[1:] if t != IGNORE_INDEX)
            total += model(**pack([e], 32, tokenizer.pad_token_id), use_cache=False).loss * n
            count += n
    # fp32 sums of the same terms in another order
    torch.testing.assert_close(packed_loss, total / count, rtol=1e-5, atol=1e-6)


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_messages_take_the_loss_on_every_assistant_turn(tmp_path, tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "ok"},
    ]
    path = write(tmp_path, [json.dumps({"messages": messages})])
    (example,), _ = load_examples(path, tokenizer, 256, train_on_prompt=False)
    ids = example.input_ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == tokenizer.apply_chat_template(messages, tokenize=False)
    targets = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert targets == "yo</s>ok</s>"  # both answers with their end-of-turn token, nothing of the user's


def test_messages_need_a_chat_template(tmp_path):
    from edge_lora.tiny import char_tokenizer

    path = write(
        tmp_path, [json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})]
    )
    with pytest.raises(UsageError, match=r"line 1: a messages record needs a tokenizer with a chat template"):
        load_examples(path, char_tokenizer(), 64, False)
