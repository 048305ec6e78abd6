"""Chat prompts through the model's own chat template, rendered without transformers.

The template is the Jinja text that transformers saved with the tokenizer (`chat_template.jinja`, or the
`chat_template` key of `tokenizer_config.json`). It is rendered the way transformers' `apply_chat_template`
renders it — a sandboxed environment with `trim_blocks`/`lstrip_blocks`, `raise_exception`, `strftime_now`, and
the special tokens as variables — so a prompt built here tokenizes to the ids the model was trained on. The
rendered text already holds the template's special tokens: encode it with add_special_tokens=False.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")


class ChatError(ValueError):
    """A chat request this model cannot render: no template, malformed messages, or the template refused them."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    """The Jinja text of the template."""
    special_tokens: dict[str, str]
    """bos_token, eos_token, ... as the template expects them."""

    @classmethod
    def load(cls, tokenizer_dir: str | Path) -> ChatTemplate | None:
        """The template saved with a tokenizer (an export dir or an HF model dir), or None when it has none."""
        tokenizer_dir = Path(tokenizer_dir)
        config_path = tokenizer_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        jinja_path = tokenizer_dir / "chat_template.jinja"
        source = jinja_path.read_text() if jinja_path.exists() else config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {entry["name"]: entry["template"] for entry in source}
            source = named.get("default")
        if not source:
            return None
        special = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):  # an AddedToken saved as {"content": ..., ...}
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
        return cls(source, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]), ending where the reply starts."""
        check_messages(messages)
        try:
            return compiled(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except ChatError:
            raise
        except Exception as e:  # a template that fails on these messages (jinja2's errors have no common base)
            raise ChatError(f"the model's chat template failed on these messages: {e}") from None


def check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"messages[{i}] must be an object with 'role' and 'content', got {message!r:.80}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role is {role!r} — use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string, got {type(content).__name__}")


_COMPILED: dict[str, object] = {}


def compiled(source: str):
    """The template compiled once per source text, in a sandbox: a template is data from a model repo, not code."""
    if source not in _COMPILED:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _COMPILED[source] = env.from_string(source)
    return _COMPILED[source]


def raise_template_error(message: str):
    raise ChatError(f"the model's chat template refused these messages: {message}")
