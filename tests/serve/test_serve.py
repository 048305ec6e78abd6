"""`edge-lora serve` against the real `openai` client and raw HTTP: answers, streams, adapters, auth, the queue's
429 and 503, a client leaving mid-stream, and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_support import live_server, slow, wait_for

from edge_lora.runtime import SamplingConfig

openai = pytest.importorskip("openai")

PROMPT = "1948-03-21 ->"
MESSAGES = [{"role": "user", "content": "1948-03-21"}]


@pytest.fixture(scope="module")
def generator(served_export):
    from edge_lora import runtime

    return runtime.load(served_export, threads=1)


@pytest.fixture(scope="module")
def live(generator):
    with live_server(generator, api_key="test-key") as server:
        yield server


def client(live, key: str = "test-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=30)


def test_completion_and_chat_match_the_runtime(live, generator):
    api = client(live)
    done = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    expected = generator.generate(PROMPT, SamplingConfig(max_new_tokens=12))
    assert done.choices[0].text == expected.text and done.choices[0].finish_reason == expected.finish_reason
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (expected.prompt_tokens, len(expected.token_ids))
    # the model field names the version that answered (name@version), as OpenAI's answers name a dated model
    assert done.system_fingerprint == generator.export.digest()[:12]
    assert done.model == f"tiny@{done.system_fingerprint}"

    chat = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    expected = generator.chat(MESSAGES, SamplingConfig(max_new_tokens=10))
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == expected.text
    assert chat.usage.prompt_tokens == expected.prompt_tokens


def test_streams_add_up_to_the_whole_answer(live):
    api = client(live)
    whole = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=["."])
    chunks = list(
        api.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stop=["."],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    whole = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(
        api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_the_model_field_picks_the_adapter(live, generator, adapter_dir):
    api = client(live)
    assert [(m.id, m.parent) for m in api.models.list().data] == [("tiny", None), (adapter_dir.name, "tiny")]
    answers = {}
    for name, adapter in (("tiny", None), (adapter_dir.name, adapter_dir.name)):
        done = api.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
        answers[name] = done.choices[0].text
        assert done.model == f"{name}@{done.system_fingerprint}"
        assert answers[name] == generator.with_adapter(adapter).generate(PROMPT, SamplingConfig(max_new_tokens=12)).text
    assert answers[adapter_dir.name] != answers["tiny"]  # the adapter was trained on this task, the base was not
    with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist"):
        api.completions.create(model="nope", prompt=PROMPT, max_tokens=4)


def test_a_wrong_or_missing_api_key_gets_401(live):
    with pytest.raises(openai.AuthenticationError) as caught:
        client(live, key="wrong").completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    assert caught.value.body["code"] == "invalid_api_key"
    bare = httpx.get(f"{live.url}/v1/models")
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{live.url}/health").status_code == 200  # open to load balancers
    assert httpx.get(f"{live.url}/metrics", headers={"Authorization": "Bearer test-key"}).status_code == 200


def test_a_full_queue_gets_429_at_once_and_a_long_wait_503(generator):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "ignore_eos": True}  # 0.8 s each here
    with live_server(slow(generator, 0.02), workers=1, queue_size=1, queue_timeout_s=20) as live:
        results = {}

        def post(key: str) -> threading.Thread:
            thread = threading.Thread(
                target=lambda: results.update({key: httpx.post(f"{live.url}/v1/completions", json=body, timeout=30)})
            )
            thread.start()
            return thread

        running = post("a")
        wait_for(lambda: live.metric("edge_lora_busy_workers") == 1)
        queued = post("b")
        wait_for(lambda: live.metric("edge_lora_queue_depth") == 1)
        started = time.perf_counter()
        refused = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30)
        assert time.perf_counter() - started < 1.0
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        running.join(30), queued.join(30)
        assert [results[k].status_code for k in "ab"] == [200, 200]
        assert all(results[k].json()["usage"]["completion_tokens"] == 40 for k in "ab")

    with live_server(slow(generator, 0.02), workers=1, queue_size=4, queue_timeout_s=0.3) as live:
        running = threading.Thread(target=lambda: httpx.post(f"{live.url}/v1/completions", json=body, timeout=30))
        running.start()
        wait_for(lambda: live.metric("edge_lora_busy_workers") == 1)
        late = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30)
        assert late.status_code == 503 and late.json()["error"]["code"] == "queue_timeout"
        running.join(30)


def test_a_client_that_leaves_mid_stream_stops_its_generation(generator):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with live_server(slow(generator, 0.02), workers=1) as live:
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # 200 tokens at 0.02 s each take 4 s: the worker must be free long before that
        wait_for(lambda: live.metric("edge_lora_busy_workers") == 0, timeout=2)
        generated = live.metric("edge_lora_generated_tokens_total", model="tiny")
        assert 1 <= generated < 50
        time.sleep(0.2)
        assert live.metric("edge_lora_generated_tokens_total", model="tiny") == generated


def test_shutdown_cancels_what_outlasts_the_grace_period(generator):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with live_server(slow(generator, 0.02), workers=1, grace_s=0.5) as live:
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            started = time.perf_counter()
            live.server.should_exit = True  # what uvicorn's SIGTERM handler does
            live.thread.join(10)
            assert not live.thread.is_alive() and time.perf_counter() - started < 3
        assert live.metric("edge_lora_generated_tokens_total", model="tiny") < 150


def test_sigterm_finishes_in_flight_requests_and_exits_0(served_export, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "EDGE_LORA_API_KEY": "env-key"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_lora",
            "serve",
            str(served_export),
            "--port",
            str(port),
            "--grace-period",
            "5",
            "--threads",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: up(url), timeout=60)
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from the environment
        headers = {"Authorization": "Bearer env-key"}
        body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            server.send_signal(signal.SIGTERM)
            rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"  # the stream in flight was finished, not cut
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert server.wait(timeout=15) == 0, server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()


def test_settings_are_checked_in_one_error():
    from edge_lora.runtime.serve.app import ServeConfig, ServeError

    with pytest.raises(ServeError, match=r"workers=0 must be >= 1; .*queue_timeout_s=0 must be > 0 seconds"):
        ServeConfig(workers=0, queue_timeout_s=0)
    done = subprocess.run(
        [sys.executable, "-m", "edge_lora", "serve", "x", "--port", "70000"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "port=70000 must be in 0..65535" in done.stderr


def up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
