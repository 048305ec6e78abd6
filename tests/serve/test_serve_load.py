"""Load on loopback: 64 concurrent clients send 500 requests, streaming and not, completions and chat. Every one
must be answered completely and correctly (greedy, so each answer is known), with no 5xx, and the server must
still be up; p50/p99 latency are printed."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import numpy as np
import pytest
from serve_support import live_server

from edge_lora.runtime import SamplingConfig

CLIENTS, REQUESTS, TIME_LIMIT_S = 64, 500, 120
PROMPTS = ["1948-03-21 ->", "2024-03-17 ->", "1999-12-31 ->", "abc", "x"]


@pytest.fixture(scope="module")
def generator(served_export):
    from edge_lora import runtime

    return runtime.load(served_export, threads=1)


def request_of(i: int) -> tuple[str, dict]:
    """The i-th request: every mix of endpoint, stream, prompt and length comes round."""
    prompt, max_tokens, stream = PROMPTS[i % len(PROMPTS)], 1 + (i * 7) % 24, i % 2 == 0
    if i % 3 == 0:
        return "/v1/chat/completions", {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        }
    return "/v1/completions", {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def expected_text(generator, path: str, body: dict) -> str:
    sampling = SamplingConfig(max_new_tokens=body["max_tokens"])
    if path == "/v1/chat/completions":
        return generator.chat(body["messages"], sampling).text
    return generator.generate(body["prompt"], sampling).text


async def send(http: httpx.AsyncClient, path: str, body: dict) -> tuple[int, str | None, float]:
    """(status, the answer's whole text or None if it was cut short, seconds)."""
    started = time.perf_counter()
    if not body["stream"]:
        response = await http.post(path, json=body)
        text = None
        if response.status_code == 200:
            choice = response.json()["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            text = text if choice["finish_reason"] in ("stop", "length") else None
        return response.status_code, text, time.perf_counter() - started
    parts, finished, done = [], False, False
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, None, time.perf_counter() - started
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            for choice in json.loads(line.removeprefix("data: "))["choices"]:
                parts.append(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])
                finished |= choice["finish_reason"] in ("stop", "length")
    return response.status_code, "".join(parts) if finished and done else None, time.perf_counter() - started


async def load(url: str) -> list[tuple[int, int, str | None, float]]:
    queue = asyncio.Queue()
    for i in range(REQUESTS):
        queue.put_nowait(i)
    results = []

    async def client(http: httpx.AsyncClient):
        while not queue.empty():
            i = queue.get_nowait()
            results.append((i, *await send(http, *request_of(i))))

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=TIME_LIMIT_S, limits=limits) as http:
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(CLIENTS))), TIME_LIMIT_S)
    return results


def test_64_clients_500_requests(generator):
    expected = {}
    for i in range(REQUESTS):
        path, body = request_of(i)
        key = (path, json.dumps(body.get("messages") or body["prompt"]), body["max_tokens"])
        if key not in expected:
            expected[key] = expected_text(generator, path, body)

    with live_server(generator, workers=2, queue_size=CLIENTS, queue_timeout_s=TIME_LIMIT_S) as live:
        started = time.perf_counter()
        results = asyncio.run(load(live.url))
        wall = time.perf_counter() - started
        assert httpx.get(f"{live.url}/health").json()["status"] == "ok"

    assert len(results) == REQUESTS
    statuses = [status for _, status, _, _ in results]
    assert not [s for s in statuses if s >= 500 and s != 503], "no 5xx but the queue's deliberate 503s"
    accepted = [(i, text) for i, status, text, _ in results if status == 200]
    assert len(accepted) == statuses.count(200) and len(accepted) >= REQUESTS * 0.9
    for i, text in accepted:
        path, body = request_of(i)
        key = (path, json.dumps(body.get("messages") or body["prompt"]), body["max_tokens"])
        assert text == expected[key], f"request {i} ({path}, stream={body['stream']}) was not answered completely"
    latency = np.array([seconds for _, status, _, seconds in results if status == 200])
    print(
        f"\n{REQUESTS} requests from {CLIENTS} clients in {wall:.1f} s ({REQUESTS / wall:.0f}/s): latency p50 "
        f"{np.percentile(latency, 50) * 1000:.0f} ms, p99 {np.percentile(latency, 99) * 1000:.0f} ms; "
        f"statuses {dict(Counter(statuses))}"
    )
