"""Answers in OpenAI's shapes: a whole completion or chat completion, or its chunks as server-sent events.

Every answer names the version of the model that produced it, twice: in its `model` field ('name@version', as
OpenAI answers 'gpt-4o' with 'gpt-4o-2024-08-06') and in the X-Model-Version header (the version alone), so that
a client, a log or a proxy can tell which adapter version served a request while versions change.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from edge_lora.runtime.serve.registry import ModelEntry
from edge_lora.runtime.serve.schema import APIError
from edge_lora.runtime.serve.workers import Finish, Job, Piece

log = logging.getLogger("edge_lora.serve")

VERSION_HEADER = "X-Model-Version"


def version_header(entry: ModelEntry) -> dict[str, str]:
    return {VERSION_HEADER: entry.version}


def stopped() -> APIError:
    return APIError(503, "the server stopped this generation as it shut down — send the request again", "shutting_down")


class TextShape:
    """Objects of /v1/completions: a whole answer, and the chunks of a streamed one."""

    def __init__(self, entry: ModelEntry):
        # every object, each chunk too, names the version: in `model`, and alone in system_fingerprint
        self.head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": entry.model_id,
            "system_fingerprint": entry.version,
        }

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        return {**self.head, "choices": [self.choice(text, finish_reason)], "usage": usage}

    def opening(self) -> list[dict]:
        return []

    def piece(self, text: str) -> dict:
        return {**self.head, "choices": [self.choice(text, None)]}

    def closing(self, finish_reason: str) -> dict:
        return {**self.head, "choices": [self.choice("", finish_reason)]}

    def usage(self, usage: dict) -> dict:
        """The chunk stream_options.include_usage asks for: after the last choice, before [DONE]."""
        return {**self.head, "choices": [], "usage": usage}


class ChatShape(TextShape):
    """Objects of /v1/chat/completions: the whole answer is a message, a chunk carries a delta."""

    def __init__(self, entry: ModelEntry):
        super().__init__(entry)
        self.head |= {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk"}

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {
            "index": 0,
            "delta": {"content": text} if text else {},
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return {**self.head, "object": "chat.completion", "choices": [choice], "usage": usage}

    def opening(self) -> list[dict]:
        return [
            {
                **self.head,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
            }
        ]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def whole(job: Job, shape: TextShape, prompt_tokens: int) -> dict:
    """The whole answer once the generation has finished."""
    parts = []
    try:
        while not isinstance(item := await job.events.get(), Finish):
            if isinstance(item, Exception):
                raise item  # answered 500 by the internal error handler, and logged by uvicorn
            parts.append(item.text)
    finally:
        job.cancel()  # a no-op once it has finished; stops it if this request was cancelled
    if item.reason == "cancelled":
        raise stopped()
    return shape.whole("".join(parts), item.reason, usage(prompt_tokens, item.completion_tokens))


async def sse(job: Job, shape: TextShape, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of a streamed answer, ending "data: [DONE]". However the stream ends, the generation
    stops: a client that disconnects makes Starlette cancel this generator, which runs the finally."""
    try:
        for chunk in shape.opening():
            yield event(chunk)
        while not isinstance(item := await job.events.get(), Finish):
            if isinstance(item, Piece):
                yield event(shape.piece(item.text))
            else:  # an error after the 200 went out: OpenAI's clients raise an error event's message
                log.error("generation failed mid-stream", exc_info=item)
                yield event(
                    APIError(
                        500,
                        f"internal error ({type(item).__name__}) during generation — the server logged it",
                        "internal_error",
                    ).body()
                )
                return
        if item.reason == "cancelled":
            yield event(stopped().body())
            return
        yield event(shape.closing(item.reason))
        if include_usage:
            yield event(shape.usage(usage(prompt_tokens, item.completion_tokens)))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
