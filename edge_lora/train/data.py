"""Training data: JSONL records → token ids with a loss mask → packed rows.

Three record shapes, one per line: {"prompt", "completion"}, {"messages": [{"role", "content"}, ...]} (rendered
with the tokenizer's chat template; the last assistant turn is the completion) and {"text"}.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from edge_lora.errors import UsageError
from edge_lora.formats import sha256_file

IGNORE_INDEX = -100  # label value that the loss skips (transformers and torch's cross_entropy default)
SHAPES = 'every line needs "prompt" and "completion" strings, or "messages", or "text"'


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    """Same length as input_ids; IGNORE_INDEX where no loss is taken."""

    @property
    def loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass(frozen=True)
class DataReport:
    path: str
    sha256: str
    samples: int
    tokens: int
    loss_tokens: int
    truncated: int
    max_tokens: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"data file {path} does not exist — pass a JSONL file, one JSON object per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"data file {path} cannot be read ({e}) — pass a UTF-8 JSONL file") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {lineno}: not valid JSON ({e.msg}) — {SHAPES}") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__} — {SHAPES}")
        records.append((lineno, record))
    if not records:
        raise UsageError(f"data file {path} holds no samples — {SHAPES}")
    return records


def split_record(record: dict, where: str) -> tuple[str, str]:
    """(prompt, completion) text of a prompt/completion or text record; the prompt of a text record is empty."""
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise UsageError(f'{where}: expected a "{name}" string, got {json.dumps(value)} — {SHAPES}')
        return prompt, completion
    if "text" in record:
        if not isinstance(record["text"], str):
            raise UsageError(f'{where}: expected a "text" string, got {json.dumps(record["text"])} — {SHAPES}')
        return "", record["text"]
    raise UsageError(f"{where}: no known fields (got {', '.join(sorted(record)) or 'none'}) — {SHAPES}")


def encode_messages(messages, tokenizer, max_length: int, train_on_prompt: bool, where: str) -> tuple[Example, bool]:
    """A conversation rendered with the tokenizer's chat template; the loss is on every assistant turn.

    Assistant spans are found in characters — the rendering of the conversation up to each assistant turn
    (with the generation prompt) and through it — and mapped to tokens by their offsets, so that the tokens
    are exactly those of the whole rendered text.
    """
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok or not any(m["role"] == "assistant" for m in messages):
        raise UsageError(
            f'{where}: "messages" must be a list of {{"role", "content"}} strings with an assistant turn — {SHAPES}'
        )
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"{where}: a messages record needs a tokenizer with a chat template; this one has none — "
            "use prompt/completion records"
        )

    def render(turns, generation_prompt=False) -> str:
        if not turns:
            return ""
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before, through = render(messages[:i], True), render(messages[: i + 1])
            if not (text.startswith(before) and text.startswith(through)):
                raise UsageError(
                    f"{where}: the chat template renders a conversation's start differently from the "
                    "whole — its assistant turns cannot be located; use prompt/completion records"
                )
            spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        tok if train_on_prompt or any(a <= start and end <= b for a, b in spans) else IGNORE_INDEX
        for tok, (start, end) in zip(ids, enc["offset_mapping"])
    ]
    labels[0] = IGNORE_INDEX
    return Example(tuple(ids[:max_length]), tuple(labels[:max_length])), len(ids) > max_length


def encode(prompt: str, completion: str, tokenizer, max_length: int, train_on_prompt: bool) -> tuple[Example, bool]:
    """Token ids with labels; returns (example, truncated). The BOS token is never a label."""
    prompt_ids = (
        tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if prompt
        else ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
    )
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    labels = (list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + completion_ids
    # The first token has no context inside its sample: in a packed row it would be predicted from the sample
    # before it, so it is never a target.
    labels[0] = IGNORE_INDEX
    truncated = len(ids) > max_length
    return Example(tuple(ids[:max_length]), tuple(labels[:max_length])), truncated


def load_examples(
    path: str | Path, tokenizer, max_length: int, train_on_prompt: bool
) -> tuple[list[Example], DataReport]:
    records = read_jsonl(path)
    examples, truncated = [], 0
    for lineno, record in records:
        where = f"{path} line {lineno}"
        if "messages" in record:
            example, cut = encode_messages(record["messages"], tokenizer, max_length, train_on_prompt, where)
        else:
            prompt, completion = split_record(record, where)
            example, cut = encode(prompt, completion, tokenizer, max_length, train_on_prompt)
        if example.loss_tokens == 0:
            raise UsageError(
                f"{where}: no completion tokens left after truncation to max_length={max_length} "
                "— raise max_length or shorten the prompt"
            )
        truncated += cut
        examples.append(example)
    report = DataReport(
        path=str(path),
        sha256=sha256_file(Path(path)),
        samples=len(examples),
        tokens=sum(len(e.input_ids) for e in examples),
        loss_tokens=sum(e.loss_tokens for e in examples),
        truncated=truncated,
        max_tokens=max(len(e.input_ids) for e in examples),
    )
    return examples, report


def batch_order(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the samples of optimizer step `step`: a fresh seeded shuffle per epoch, so that a resumed
    run draws exactly the batches an uninterrupted one would."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[index * batch_size : (index + 1) * batch_size]


def pack(examples: list[Example], pack_length: int, pad_id: int):
    """Pack samples into rows of at most `pack_length` tokens, first fit by decreasing length.

    Positions restart at 0 for every sample and no attention mask is passed, which makes transformers build a
    block-diagonal causal mask from the position ids: no token attends across a sample boundary.
    Returns torch tensors input_ids, labels, position_ids of shape (rows, longest row).
    """
    import torch

    rows: list[list[Example]] = []
    free: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(example.input_ids)
        for i, room in enumerate(free):
            if n <= room:
                rows[i].append(example)
                free[i] -= n
                break
        else:
            rows.append([example])
            free.append(pack_length - n)
    width = max(pack_length - room for room in free)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    # Padding gets position 0 everywhere, so each pad token is a sequence of its own and is never attended to.
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids)
            labels[r, at : at + n] = torch.tensor(example.labels)
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
