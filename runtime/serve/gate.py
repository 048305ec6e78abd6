"""What every request passes before it reaches an endpoint, and how every error is answered.

The gate is plain ASGI middleware, outermost, so that it counts and times every answer (401s and 413s too),
refuses a request without the API key before its body is read, and limits the body whether or not it
announces its length. It is written here rather than taken from Starlette because Starlette's body limit
answers in plain text (and only its recent releases have one), and every error of this server is in OpenAI's JSON
shape.
"""

from __future__ import annotations

import hmac
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_lora.runtime.serve.metrics import ServerMetrics
from edge_lora.runtime.serve.schema import APIError

OPEN_PATHS = ("/health",)  # answered without the API key, for load balancers and orchestrators


class Gate:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics, api_key: str | None, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_counted)
            else:
                await self.app(scope, self.limited(receive), send_counted)
        finally:
            self.metrics.observe_request(scope["path"], status, started)

    def refusal(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])  # lower-case byte names, as ASGI gives them
        if self._key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            # compare_digest takes as long for a wrong key as for a right one: no timing oracle on the key
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                return APIError(
                    401,
                    "missing or wrong API key — send the header 'Authorization: Bearer KEY' with "
                    "the server's --api-key",
                    "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return self.too_large(length.decode("latin-1")[:20])
        return None

    def too_large(self, size: str) -> APIError:
        return APIError(
            413,
            f"request body of {size} bytes is over the limit of {self.max_body_bytes} — send a "
            "shorter prompt, or start the server with a larger --max-body-bytes",
            "body_too_large",
        )

    def limited(self, receive: Receive) -> Receive:
        """`receive` that refuses a body (chunked, or longer than it said) once it passes the limit."""
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self.too_large(f"more than {self.max_body_bytes}")
            return message

        return receive_limited


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# Codes for the errors Starlette and FastAPI raise themselves.
HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        fix = {
            404: " — the endpoints are /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics",
            405: " — see the OpenAI API reference for the method of this endpoint",
            400: " — send a JSON object in UTF-8",
        }.get(error.status_code, "")
        code = HTTP_CODES.get(error.status_code, f"http_{error.status_code}")
        return error_response(APIError(error.status_code, f"{error.detail}{fix}", code, headers=error.headers))

    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error.errors()))

    async def internal(request: Request, error: Exception) -> JSONResponse:
        # Starlette raises the error again once this answer is sent, and uvicorn logs it with its traceback
        return error_response(
            APIError(
                500,
                f"internal error ({type(error).__name__}) — the server logged it; report it with the request",
                "internal_error",
            )
        )

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(Exception, internal)


def validation_error(errors: list[dict]) -> APIError:
    """The first problem pydantic found, as a 400 (not JSON) or a 422 (JSON of the wrong shape)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "invalid JSON")
        return APIError(
            400,
            f"the body is not valid JSON ({reason} at character {first['loc'][-1]}) — send one JSON object",
            "invalid_json",
        )
    if isinstance(first.get("input"), bytes):  # FastAPI reads JSON only when the request says it is JSON
        return APIError(
            422,
            "the body was not read as JSON — send it with the header Content-Type: application/json",
            "invalid_content_type",
        )
    # A union field (prompt: str | list[str]) fails once per branch; a branch of the input's own type says most
    # ("at most 4 items"), the others only that it is not of their type.
    first = next((e for e in errors if not e["type"].endswith("_type")), first)
    # loc is ("body", field, ...), with pydantic's union branch names (str, list[str]) among the parts
    where = ".".join(str(part) for part in first["loc"][1:]) or "body"
    param = str(first["loc"][1]) if len(first["loc"]) > 1 else None
    others = len({tuple(e["loc"][:2]) for e in errors} - {tuple(first["loc"][:2])})  # other fields with problems
    more = f" (and problems in {others} more fields)" if others else ""
    given = repr(first.get("input"))
    given = given if len(given) <= 60 else given[:57] + "..."
    return APIError(
        422,
        f"{where}: {first['msg']}, got {given}{more} — see the OpenAI API reference for this field",
        "invalid_value",
        param=param,
    )
