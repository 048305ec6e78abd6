"""Tokenizing with `tokenizers` from tokenizer.json, and decoding a token stream into text deltas."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TextTokenizer:
    def __init__(self, path: Path):
        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with add_special_tokens, the tokenizer's own special tokens (a BOS where the model expects
        one). Text rendered by a chat template already holds them: encode it with add_special_tokens=False."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class StreamDecoder:
    """Turns token ids, one at a time, into text deltas that never split a multi-byte character.

    Byte-level tokenizers can emit half a UTF-8 character per token; decoding those alone gives U+FFFD. So the
    text of the tokens since the last emitted delta is decoded again with a little left context and held back
    while it ends in U+FFFD.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._context = 0  # start of the tokens decoded for left context
        self._emitted = 0  # start of the tokens not yet emitted as text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._tok.decode(self._ids[self._context : self._emitted])
        text = self._tok.decode(self._ids[self._context :])
        if text.endswith("\ufffd") or len(text) <= len(prefix):
            return ""
        self._context, self._emitted = self._emitted, len(self._ids)
        return text[len(prefix) :]
