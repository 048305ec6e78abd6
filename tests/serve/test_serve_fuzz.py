"""Bad request bodies: each one gets a 4xx in OpenAI's error shape without reaching the model, and the server
answers a good request right after."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_support import live_server

GOOD = {"model": "tiny", "prompt": "1948-03-21 ->", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MAX_BODY = 64 * 1024


def with_(base: dict, **changes) -> bytes:
    return json.dumps({**base, **changes}).encode()


# (name, path, raw body, status); bodies are bytes, so that they can be anything at all.
CASES = [
    ("empty body", "/v1/completions", b"", 422),
    ("truncated JSON", "/v1/completions", b'{"prompt": "x", ', 400),
    ("not JSON", "/v1/completions", b"prompt=hello", 400),
    ("JSON array", "/v1/completions", b"[1, 2]", 422),
    ("JSON null", "/v1/completions", b"null", 422),
    ("invalid UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe\xfd"}', 400),
    ("lone surrogate", "/v1/completions", b'{"prompt": "a\\ud800b"}', 400),
    ("lone surrogate in chat", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    ("NaN", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 422),  # Python's JSON reads NaN
    ("Infinity", "/v1/completions", b'{"prompt": "x", "temperature": Infinity}', 422),
    ("no prompt", "/v1/completions", with_({"model": "tiny"}), 422),
    ("prompt a number", "/v1/completions", with_(GOOD, prompt=5), 422),
    ("prompt null", "/v1/completions", with_(GOOD, prompt=None), 422),
    ("prompt of token ids", "/v1/completions", with_(GOOD, prompt=[1, 2, 3]), 422),
    ("two prompts", "/v1/completions", with_(GOOD, prompt=["a", "b"]), 422),
    ("empty prompt list", "/v1/completions", with_(GOOD, prompt=[]), 422),
    ("max_tokens a string", "/v1/completions", with_(GOOD, max_tokens="5"), 422),
    ("max_tokens a bool", "/v1/completions", with_(GOOD, max_tokens=True), 422),
    ("max_tokens a float", "/v1/completions", with_(GOOD, max_tokens=1.5), 422),
    ("max_tokens negative", "/v1/completions", with_(GOOD, max_tokens=-1), 422),
    ("max_tokens zero", "/v1/completions", with_(GOOD, max_tokens=0), 422),
    ("max_tokens huge", "/v1/completions", with_(GOOD, max_tokens=10**30), 400),
    ("max_tokens over the context", "/v1/completions", with_(GOOD, max_tokens=256), 400),
    ("temperature negative", "/v1/completions", with_(GOOD, temperature=-1), 422),
    ("temperature huge", "/v1/completions", with_(GOOD, temperature=1e308), 422),
    ("temperature a string", "/v1/completions", with_(GOOD, temperature="hot"), 422),
    ("top_p zero", "/v1/completions", with_(GOOD, top_p=0), 422),
    ("top_k negative", "/v1/completions", with_(GOOD, top_k=-3), 422),
    ("seed negative", "/v1/completions", with_(GOOD, seed=-1), 422),
    ("seed huge", "/v1/completions", with_(GOOD, seed=2**80), 422),
    ("n = 2", "/v1/completions", with_(GOOD, n=2), 422),
    ("logprobs", "/v1/completions", with_(GOOD, logprobs=5), 422),
    ("stream a string", "/v1/completions", with_(GOOD, stream="yes"), 422),
    ("too many stops", "/v1/completions", with_(GOOD, stop=["a"] * 10), 422),
    ("empty stop", "/v1/completions", with_(GOOD, stop=[""]), 422),
    ("unknown model", "/v1/completions", with_(GOOD, model="nope"), 404),
    ("a path as the model", "/v1/completions", with_(GOOD, model="../../../etc/passwd"), 404),
    ("model a number", "/v1/completions", with_(GOOD, model=7), 422),
    ("prompt over the context", "/v1/completions", with_(GOOD, prompt="7" * 20_000), 400),
    ("body over the limit", "/v1/completions", with_(GOOD, prompt="7" * (MAX_BODY + 1)), 413),
    ("no messages", "/v1/chat/completions", with_(CHAT, messages=[]), 422),
    ("messages a string", "/v1/chat/completions", with_(CHAT, messages="hi"), 422),
    ("unknown role", "/v1/chat/completions", with_(CHAT, messages=[{"role": "wizard", "content": "x"}]), 400),
    ("message without content", "/v1/chat/completions", with_(CHAT, messages=[{"role": "user"}]), 422),
    ("content a number", "/v1/chat/completions", with_(CHAT, messages=[{"role": "user", "content": 5}]), 422),
    (
        "image content",
        "/v1/chat/completions",
        with_(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        422,
    ),
    ("tools", "/v1/chat/completions", with_(CHAT, tools=[{"type": "function"}]), 422),
    ("unknown path", "/v1/nothing", with_(GOOD), 404),
]


@pytest.fixture(scope="module")
def live(served_export):
    from edge_lora import runtime

    with live_server(runtime.load(served_export, threads=1), workers=1, max_body_bytes=MAX_BODY) as server:
        yield server


def test_every_bad_body_gets_a_4xx_and_never_reaches_the_model(live):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for name, path, body, status in CASES:
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], name
            assert "\n" not in error["message"], name
        assert http.get("/v1/completions").status_code == 405
        as_text = http.post("/v1/completions", content=with_(GOOD), headers={"Content-Type": "text/plain"})
        assert as_text.status_code == 422 and as_text.json()["error"]["code"] == "invalid_content_type"
        chunked = http.post(
            "/v1/completions",
            content=iter([b'{"prompt": "', b"7" * MAX_BODY, b'"}']),
            headers={"Content-Type": "application/json"},
        )  # no Content-Length: counted as it comes
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
        assert live.metric("edge_lora_prompt_tokens_total", model="tiny") == 0
        assert live.metric("edge_lora_generated_tokens_total", model="tiny") == 0

        good = http.post("/v1/completions", json=GOOD)
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    served = live.app.state.metrics.registry.get_sample_value
    assert served("edge_lora_requests_total", {"endpoint": "/v1/completions", "status": "500"}) is None


def test_an_error_names_the_field_the_value_and_the_fix(live):
    response = httpx.post(f"{live.url}/v1/completions", json={**GOOD, "max_tokens": "5"})
    assert response.json()["error"] == {
        "message": "max_tokens: Input should be a valid integer, got '5' — see the OpenAI API reference for this field",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "invalid_value",
    }
    response = httpx.post(f"{live.url}/v1/completions", json={**GOOD, "max_tokens": 250})
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert "exceeds the context of 256 tokens" in response.json()["error"]["message"]
