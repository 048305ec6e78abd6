"""The request bodies the server takes (OpenAI's completions and chat completions) and its errors, in OpenAI's
JSON error shape: {"error": {"message", "type", "param", "code"}}.

Bodies are validated strictly (pydantic strict mode: "5" is not an int, true is not a number) so that a request
means what it says; fields OpenAI defines that this runtime cannot honour are refused when set, not ignored.
Fields no client of this server sends are ignored, as OpenAI does, so that newer clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_SEED = 2**64 - 1  # numpy's generator takes any int >= 0; this keeps it to 64 bits


class APIError(HTTPException):
    """An answer other than 200, raised anywhere in a request and rendered in OpenAI's error shape.

    An HTTPException, so that FastAPI passes it on as it is when it is raised while the body is read (the
    body size limit) rather than turning it into a 400.
    """

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(status, message, headers)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# OpenAI's error types by status; 409, 413, 422 are request errors like 400.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send one more chunk before [DONE], with the usage and no choices."""


class SamplingFields(_Strict):
    """The fields both endpoints share: which model, how to sample, when to stop, whether to stream."""

    model: str | None = Field(default=None, max_length=256)
    """A name from GET /v1/models: the base, or an adapter. None: the base."""
    max_tokens: int | None = Field(default=None, ge=1)
    """New tokens at most; the prompt plus these must fit the model's context."""
    temperature: float = Field(default=1.0, ge=0, le=2)
    """OpenAI's default is 1 (sampling); 0 is greedy."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    """Not OpenAI's, as vLLM and llama.cpp take it: sample among the k most likely tokens (0: all)."""
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None = None
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    """Not OpenAI's, as vLLM takes it: CTRL's penalty on tokens already seen (1: off)."""
    ignore_eos: bool = False
    """Not OpenAI's, as vLLM takes it: generate past end-of-sequence, up to max_tokens (benchmarks)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    """One choice per request: ask again for more."""
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[False, 0] | None = None
    """Not given: token log-probabilities are not computed (completions take a count, chat a flag)."""
    logit_bias: None = None
    user: str | None = None
    """Accepted and not used."""

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    """Text, or a list of one text (OpenAI's batch of prompts is not taken: send one request each)."""
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str = Field(max_length=32)
    """Checked against the roles the runtime renders (runtime.chat.ROLES)."""
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: None = None
    tool_choice: None = None
    response_format: None = None
