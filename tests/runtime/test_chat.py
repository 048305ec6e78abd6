"""The runtime's chat template rendering against transformers' apply_chat_template on the same tokenizer."""

from __future__ import annotations

import pytest

from edge_lora.runtime.chat import ChatError, ChatTemplate

# A Llama-3-like template: bos_token, a system default, loop controls, raise_exception on a bad role order.
TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|system|>You are terse.<|end|>{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": " 2024-03-17 -> "},
    {"role": "assistant", "content": "17.03.2024"},
    {"role": "user", "content": "1999-12-31 ->"},
]


@pytest.fixture()
def saved_tokenizer(tmp_path):
    from edge_lora.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(tmp_path)
    return tokenizer, tmp_path


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_renders_what_transformers_renders(saved_tokenizer, generation_prompt):
    tokenizer, path = saved_tokenizer
    template = ChatTemplate.load(path)
    ours = template.render(MESSAGES, add_generation_prompt=generation_prompt)
    assert ours == tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)

    from edge_lora.runtime.tokenizer import TextTokenizer

    ids = TextTokenizer(path / "tokenizer.json").encode(ours, add_special_tokens=False)
    assert ids == tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt
    )


def test_a_tokenizer_without_template_has_none(tmp_path):
    from edge_lora.tiny import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path)
    assert ChatTemplate.load(tmp_path) is None


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\]\.role is 'robot'"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string, got int"),
        ([{"role": "tool", "content": "x"}], "refused these messages: tools are not supported"),
    ],
)
def test_bad_messages_are_named(saved_tokenizer, messages, match):
    with pytest.raises(ChatError, match=match):
        ChatTemplate.load(saved_tokenizer[1]).render(messages)


def test_the_template_runs_sandboxed(tmp_path):
    template = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(ChatError, match="chat template failed"):
        template.render([{"role": "user", "content": "hi"}])
