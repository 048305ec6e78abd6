"""Roll-out while serving: a new adapter version goes live under load without losing a request, every answer names
the version that served it, a rollback restores the earlier outputs exactly, a version that does not fit the model
is refused while the live one stays, admin needs the API key, and `edge-lora serve-admin` drives it all."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_support import live_server, rewrite_adapter, slow, wait_for

from edge_lora.runtime import SamplingConfig
from edge_lora.runtime.package import sha256_file

KEY = "admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["1948-03-21 ->", "2024-03-17 ->", "1999-12-31 ->", "abc", "x"]
MAX_TOKENS = 12


@dataclass(frozen=True)
class Versions:
    name: str
    """The adapter's name in the export."""
    v1: Path
    """The export's own .onnx_adapter."""
    v2: Path
    """The same adapter with half its delta: a second version whose greedy answers differ from the first's."""
    expected: dict
    """{version: {prompt: greedy text of MAX_TOKENS}}, for both versions and the base, computed on the runtime."""

    @property
    def ids(self) -> tuple[str, str]:
        return sha256_file(self.v1)[:12], sha256_file(self.v2)[:12]


@pytest.fixture(scope="module")
def generator(served_export):
    from edge_lora import runtime

    return runtime.load(served_export, threads=1)


@pytest.fixture(scope="module")
def versions(served_export, generator, adapter_dir, tmp_path_factory) -> Versions:
    from edge_lora.runtime.generate import Generator
    from edge_lora.runtime.lora import Adapter

    name = adapter_dir.name
    v1 = served_export / "adapters" / f"{name}.onnx_adapter"
    v2 = rewrite_adapter(
        v1,
        tmp_path_factory.mktemp("rollout") / "v2.onnx_adapter",
        lambda tensors: changed_all(tensors, "lora_B", lambda v: v * np.float32(0.5)),
    )
    lora2 = Adapter(v2)
    views = {
        sha256_file(v1)[:12]: generator.with_adapter(name),
        sha256_file(v2)[:12]: Generator(
            generator.export, generator.session, generator.tokenizer, {name: lora2}
        ).with_adapter(name),
        generator.export.digest()[:12]: generator,
    }
    expected = {
        version: {p: view.generate(p, SamplingConfig(max_new_tokens=MAX_TOKENS)).text for p in PROMPTS}
        for version, view in views.items()
    }
    v1_id, v2_id = sha256_file(v1)[:12], sha256_file(v2)[:12]
    assert all(expected[v1_id][p] != expected[v2_id][p] for p in PROMPTS)  # else the test could not tell them apart
    return Versions(name, v1, v2, expected)


def answer_of(response: httpx.Response, stream: bool) -> tuple[str, str, str]:
    """(model field, X-Model-Version, text) of a completion, whole or streamed; every chunk must name one model."""
    assert response.status_code == 200, response.text
    if not stream:
        body = response.json()
        return body["model"], response.headers["x-model-version"], body["choices"][0]["text"]
    chunks = [
        json.loads(line.removeprefix("data: "))
        for line in response.text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    assert response.text.rstrip().endswith("data: [DONE]") and len({c["model"] for c in chunks}) == 1
    return chunks[0]["model"], response.headers["x-model-version"], "".join(c["choices"][0]["text"] for c in chunks)


def test_a_swap_under_load_loses_no_request_and_each_answer_names_its_version(generator, versions):
    name, (v1, v2) = versions.name, versions.ids
    base = generator.export.digest()[:12]
    per_batch = 16  # each way: 2 workers busy, the rest queued when the new version goes live

    def request(i: int) -> tuple[str, dict]:
        model = "tiny" if i % 4 == 3 else name
        return model, {
            "model": model,
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": i % 2 == 0,
        }

    with live_server(slow(generator, 0.02), workers=2, queue_size=64, api_key=KEY) as live:

        async def ask(http: httpx.AsyncClient, i: int):
            model, body = request(i)
            response = await http.post("/v1/completions", json=body)
            return model, body, answer_of(response, body["stream"])

        async def until(condition):
            deadline = time.monotonic() + 10
            while not condition():
                assert time.monotonic() < deadline, "not true within 10 s"
                await asyncio.sleep(0.005)

        async def scenario():
            async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=60) as http:
                before = [asyncio.create_task(ask(http, i)) for i in range(per_batch)]
                # every request of the first batch has resolved its model: it is running, queued, or answered
                await until(
                    lambda: (
                        live.metric("edge_lora_busy_workers")
                        + live.metric("edge_lora_queue_depth")
                        + sum(task.done() for task in before)
                        == per_batch
                    )
                )
                pushed = await http.post(f"/admin/adapters/{name}", content=versions.v2.read_bytes())
                running_at_swap = live.metric("edge_lora_busy_workers")
                after = [asyncio.create_task(ask(http, i)) for i in range(per_batch, 2 * per_batch)]
                return pushed, running_at_swap, await asyncio.gather(*before), await asyncio.gather(*after)

        pushed, running_at_swap, before, after = asyncio.run(scenario())
        assert pushed.status_code == 200, pushed.text
        assert pushed.json() == {
            "id": name,
            "object": "adapter",
            "version": v2,
            "model": f"{name}@{v2}",
            "source": "upload",
            "rollback_versions": [v1],
            "changed": True,
            "replaced": v1,
        }
        assert running_at_swap == 2 and len(before) == len(after) == per_batch  # the swap came mid-generation
        for batch, adapter_version in ((before, v1), (after, v2)):
            for model, body, (model_field, header, text) in batch:
                version = base if model == "tiny" else adapter_version
                assert (model_field, header) == (f"{model}@{version}", version)
                assert text == versions.expected[version][body["prompt"]]  # the version named is the one that ran
        adapter_requests = sum(request(i)[0] == name for i in range(per_batch))
        for version in (v1, v2):
            assert live.metric("edge_lora_model_requests_total", model=name, version=version) == adapter_requests
        assert live.metric("edge_lora_model_info", model=name, version=v2) == 1
        assert live.metric("edge_lora_model_info", model=name, version=v1) == 0  # no longer listed


def test_rollback_restores_the_earlier_version_exactly(generator, versions):
    name, (v1, v2) = versions.name, versions.ids
    with live_server(generator, workers=1, api_key=KEY) as live:
        http = httpx.Client(base_url=live.url, headers=AUTH, timeout=30)

        def answers(model: str = name) -> list[tuple[str, str]]:
            bodies = [
                http.post(
                    "/v1/completions", json={"model": model, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}
                ).json()
                for p in PROMPTS
            ]
            return [(b["model"], b["choices"][0]["text"]) for b in bodies]

        first = answers()
        assert first == [(f"{name}@{v1}", versions.expected[v1][p]) for p in PROMPTS]
        assert http.post(f"/admin/adapters/{name}", content=versions.v2.read_bytes()).json()["version"] == v2
        assert answers() == [(f"{name}@{v2}", versions.expected[v2][p]) for p in PROMPTS]

        rolled = http.post(f"/admin/adapters/{name}/rollback")
        assert rolled.status_code == 200 and rolled.json()["version"] == v1 and rolled.json()["replaced"] == v2
        assert answers() == first
        assert live.app.state.registry.adapter(name).adapter is generator.adapters[name]  # the very loaded adapter
        assert answers(f"{name}@{v1}") == first  # the name a response gives can be asked for again

        again = http.post(f"/admin/adapters/{name}/rollback")
        assert again.status_code == 409 and again.json()["error"]["code"] == "nothing_to_roll_back"
        assert f"it is at {v1}, the version it started with" in again.json()["error"]["message"]
        gone = http.post("/v1/completions", json={"model": f"{name}@{v2}", "prompt": "x", "max_tokens": 1})
        assert gone.status_code == 404 and f"{name} is at version {v1} now" in gone.json()["error"]["message"]
        same = http.post(f"/admin/adapters/{name}", content=versions.v1.read_bytes())
        assert same.json()["changed"] is False and same.json()["rollback_versions"] == []
        assert [live.metric("edge_lora_adapter_changes_total", model=name, action=a) for a in ("load", "rollback")] == [
            1,
            1,
        ]
        store = live.app.state.store.dir
        assert sorted(p.name for p in store.iterdir()) == []  # v2's copy went with its rollback
    assert not store.exists()  # the store goes with the server


def broken(versions: Versions, tmp_path: Path, change) -> bytes:
    return rewrite_adapter(versions.v1, tmp_path / "broken.onnx_adapter", change).read_bytes()


def renamed(tensors: dict) -> dict:
    first = sorted(tensors)[0]
    return {("model.layers.0.nowhere.lora_A" if k == first else k): v for k, v in tensors.items()}


def changed_all(tensors: dict, suffix: str, change) -> dict:
    return {k: change(v) if k.endswith(suffix) else v for k, v in tensors.items()}


def changed_one(tensors: dict, suffix: str, change) -> dict:
    target = next(k for k in sorted(tensors) if k.endswith(suffix))
    return {k: change(v) if k == target else v for k, v in tensors.items()}


def test_a_version_that_does_not_fit_is_refused_and_the_live_one_stays(generator, versions, tmp_path):
    name, (v1, _) = versions.name, versions.ids
    cases = [  # (what is sent, status, code, words of the message)
        (b"not an adapter at all", 422, "invalid_adapter", "onnxruntime cannot read it as an adapter"),
        (b"", 422, "empty_adapter", "the body is empty"),
        (broken(versions, tmp_path, renamed), 422, "invalid_adapter", "is not a LoRA input of this model"),
        (
            broken(versions, tmp_path, lambda t: changed_one(t, "lora_A", lambda v: np.vstack([v, v[:1]]))),
            422,
            "invalid_adapter",
            "the model takes",
        ),
        (
            broken(versions, tmp_path, lambda t: changed_one(t, "lora_A", lambda v: v[:, 1:].copy())),
            422,
            "invalid_adapter",
            "has rank",
        ),
        (
            broken(versions, tmp_path, lambda t: changed_one(t, "lora_B", lambda v: v * np.float32(np.nan))),
            422,
            "invalid_adapter",
            "holds NaN or inf",
        ),
        (
            broken(versions, tmp_path, lambda t: {k: v.astype(np.float16) for k, v in t.items()}),
            422,
            "invalid_adapter",
            "is tensor(float16), the model takes tensor(float)",
        ),
        (b"\0" * 300_000, 413, "body_too_large", "start the server with a larger --admin-max-body-bytes"),
    ]
    with live_server(generator, workers=1, api_key=KEY, admin_max_body_bytes=250_000) as live:
        http = httpx.Client(base_url=live.url, headers=AUTH, timeout=30)
        for body, status, code, words in cases:
            refused = http.post(f"/admin/adapters/{name}", content=body)
            error = refused.json()["error"]
            assert (refused.status_code, error["code"]) == (status, code), error
            assert words in error["message"] and "\n" not in error["message"]
            if code == "invalid_adapter":
                assert f"{v1} stays live" in error["message"]
        listed = http.get("/admin/adapters").json()["data"]
        assert [(a["id"], a["version"], a["rollback_versions"]) for a in listed] == [(name, v1, [])]
        assert live.metric("edge_lora_adapter_changes_total", model=name, action="refused") == 6
        assert list(live.app.state.store.dir.iterdir()) == []  # nothing refused stays on disk
        for unknown, what in ((name + "x", "is not an adapter of this server"), ("tiny", "is the base model")):
            missing = http.post(f"/admin/adapters/{unknown}", content=versions.v2.read_bytes())
            assert missing.status_code == 404 and what in missing.json()["error"]["message"]
        assert http.post("/v1/completions", json={"model": name, "prompt": "x"}).status_code == 200


def test_admin_is_off_without_an_api_key_and_needs_the_key_with_one(generator, versions):
    with live_server(generator, workers=1) as live:
        for method, path in (
            ("GET", "/admin/adapters"),
            ("POST", f"/admin/adapters/{versions.name}"),
            ("POST", f"/admin/adapters/{versions.name}/rollback"),
        ):
            off = httpx.request(method, live.url + path, content=versions.v2.read_bytes() if method == "POST" else None)
            assert off.status_code == 404 and off.json()["error"]["code"] == "admin_disabled"
            assert "restart it with --api-key" in off.json()["error"]["message"]
    with live_server(generator, workers=1, api_key=KEY) as live:
        wrong = httpx.post(
            f"{live.url}/admin/adapters/{versions.name}",
            content=versions.v2.read_bytes(),
            headers={"Authorization": "Bearer nope"},
        )
        assert wrong.status_code == 401
        wait_for(lambda: live.metric("edge_lora_requests_total", endpoint="/admin/adapters/{name}", status="401") == 1)
        assert httpx.get(f"{live.url}/admin/adapters", headers=AUTH).json()["data"][0]["version"] == versions.ids[0]


def test_the_cli_pushes_lists_and_rolls_back(generator, versions):
    name, (v1, v2) = versions.name, versions.ids

    def cli(*args: str, key: str = KEY) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "edge_lora", "serve-admin", *args, "--api-key", key],
            capture_output=True,
            text=True,
            timeout=60,
        )

    with live_server(generator, workers=1, api_key=KEY) as live:
        pushed = cli("push", live.url, name, str(versions.v2))
        assert pushed.returncode == 0, pushed.stderr
        assert json.loads(pushed.stdout)["version"] == v2
        listed = cli("list", live.url)
        assert json.loads(listed.stdout)["data"][0]["rollback_versions"] == [v1]
        assert json.loads(cli("rollback", live.url, name).stdout)["version"] == v1
        refused = cli("rollback", live.url, name)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert "the server answered 409: adapter" in refused.stderr
        wrong_key = cli("push", live.url, name, str(versions.v2), key="nope")
        assert wrong_key.returncode == 2 and "the server answered 401: missing or wrong API key" in wrong_key.stderr
