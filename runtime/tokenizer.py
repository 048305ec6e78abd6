"""Tokenizing with `tokenizers` from tokenizer.json, and turning token streams into text deltas cut at stop strings."""

from __future__ import annotations

from collections.abc import Sequence
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

    def flush(self) -> str:
        """The text of the tokens held back, at the end of a generation: an unfinished character decodes to
        U+FFFD here, as it does in a decode of the whole output."""
        prefix = self._tok.decode(self._ids[self._context : self._emitted])
        text = self._tok.decode(self._ids[self._context :])
        self._context = self._emitted = len(self._ids)
        return text[len(prefix) :]


class StopStrings:
    """Cuts generated text before the first stop string, letting out only text that cannot become part of one.

    Text deltas go in as they are decoded. The longest end of the text that is the start of a stop string is
    held back until later text completes the stop string (then it and everything after are dropped) or rules
    it out (then it is let out), so that a stream never shows a part of a stop string.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(stops)
        self._held = ""
        self.stopped: str | None = None
        """The stop string that ended the text, once one has."""

    def push(self, delta: str) -> str:
        """The text that is now certain to come before any stop string; "" once one has been found."""
        if self.stopped is not None:
            return ""
        text = self._held + delta
        # Emitted text never holds the start of a stop string (it would have been held), so a stop string
        # is either whole in `text` or still to come.
        found = [(at, stop) for stop in self._stops if (at := text.find(stop)) >= 0]
        if found:
            at, self.stopped = min(found)
            self._held = ""
            return text[:at]
        held = max(
            (k for stop in self._stops for k in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:k])),
            default=0,
        )
        self._held = text[len(text) - held :]
        return text[: len(text) - held]

    def flush(self) -> str:
        """The text held back, at the end of a generation that no stop string ended."""
        held, self._held = self._held, ""
        return held
