"""Eval data: the JSONL shapes training reads, as (prompt, reference) pairs.

prompt/completion  the completion is the reference
messages           the last assistant turn is the reference; the turns before it, rendered with the target's
                   chat template and its generation prompt, are the prompt
text               the whole text is the reference with an empty prompt: it has no answer to generate, so only
                   perplexity can use it
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge_lora.errors import UsageError
from edge_lora.train.data import SHAPES, read_jsonl, split_record


class EvalError(UsageError):
    """Eval input that cannot work: a data file, a metric or a pair of targets; the message says the fix."""


@dataclass(frozen=True)
class EvalSample:
    where: str
    """file:line of the record."""
    reference: str
    prompt: str = ""
    """The prompt text of a prompt/completion record; empty for a text record."""
    messages: tuple[dict, ...] = ()
    """The turns before the reference of a messages record, to be rendered by the target's chat template."""
    shape: str = "prompt/completion"
    """"prompt/completion", "messages" or "text"."""


def read_samples(path: str | Path) -> list[EvalSample]:
    """Every record of an eval JSONL file, or an EvalError naming the file and line of the first bad one."""
    samples = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in record:
            samples.append(messages_sample(record["messages"], where))
            continue
        prompt, reference = split_record(record, f"{path} line {lineno}")
        samples.append(
            EvalSample(where, reference, prompt, shape="prompt/completion" if "completion" in record else "text")
        )
    return samples


def messages_sample(messages, where: str) -> EvalSample:
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise EvalError(
            f'{where}: "messages" must be a list of {{"role", "content"}} strings, '
            f"got {json.dumps(messages)[:80]} — {SHAPES}"
        )
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise EvalError(
            f"{where}: a messages record needs an assistant turn after at least one other turn — "
            "its last assistant turn is the reference and the turns before it the prompt"
        )
    return EvalSample(where, messages[last]["content"], messages=tuple(messages[:last]), shape="messages")


def check_metric_fits(samples: list[EvalSample], metric: str) -> None:
    """A generation metric needs a prompt to answer: text records fit perplexity only."""
    if metric != "perplexity":
        text = next((s for s in samples if s.shape == "text"), None)
        if text is not None:
            raise EvalError(
                f"{text.where}: a text record has no reference answer for --metric {metric} — "
                "use --metric perplexity, or prompt/completion or messages records"
            )
