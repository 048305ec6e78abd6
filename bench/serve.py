"""Serving benchmark: `edge-lora serve` against llama-cpp-python's OpenAI server on the same weights,
shape and threads: requests/s and p50/p99 time to first token at 1, 4 and 16 concurrent streaming clients.

    .venv/bin/python bench/serve.py                          # the reference shape, 2 threads, edge-lora 1 worker
    .venv/bin/python bench/serve.py --threads 2 --workers 2  # edge-lora: 2 workers of 1 thread each
    .venv/bin/python bench/serve.py --quick                  # a tiny model, to check the script (under a minute)

The models are bench/runtime.py's, built by its own build functions and cached in the same `--workdir`
(bench/runtime.py's docstring says how): edge-lora serves the int4 export of the base with a merged 1-step
adapter (by default the builder graph in blocks of 64, what `edge-lora export --device cpu-x86-64` writes for a
Llama; `--graph torch` for torch's exporter's), llama.cpp the base's Q4_0 GGUF. Latency does not depend on weight
values.

Both servers run at once, each in its own process on a free loopback port, but only one is loaded at a time:

- `edge_lora`: `python -m edge_lora serve EXPORT --workers W --threads T/W --queue-timeout 600`. Total threads
  are the same as llama.cpp's. The queue timeout is raised from 60 s so that a slow machine measures queueing
  rather than 503s; the queue (32) holds 16 clients.
- `llamacpp`: `python -m llama_cpp.server --model GGUF --n_threads T --n_threads_batch T --n_ctx 512
  --interrupt_requests False --verbose False`. Its default `interrupt_requests=True` ends a stream early
  whenever another request is waiting, which would make it look fast under concurrency by answering less.
  One model object behind a lock: it generates one request at a time, as edge-lora does with 1 worker.

Every request is a streaming `/v1/completions` of a prompt of about `--prompt-tokens` tokens of random words
(a different prompt per request, the same list for both servers: llama-cpp-python reuses the KV cache of the
longest common prefix with the previous request, which one repeated prompt would turn into a free prefill),
`temperature` 0, forced to `--max-tokens` new tokens (edge-lora `ignore_eos`, llama.cpp `min_tokens`). A request
counts only if its stream ends with finish_reason "length". Per request the client (httpx, asyncio, in this
process) measures time to first token (request sent → first SSE chunk carrying text) and total latency.

At each concurrency level C, each server gets max(--requests, --requests-per-client × C) requests from C clients
that each send their next request as soon as the last one ends, in two blocks per server in A B B A order (the
first server alternates from level to level), so that load drift hits both. Requests/s is requests over the blocks' wall
time. Each block records the load average and each server's CPU time (psutil): CPU ÷ wall near T means the
server had its threads, far below means it waited for the machine (or, for the idle one, that it is idle).
The last line printed is one JSON object; raw samples go to WORKDIR/SHAPE/serve-samples-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RUNTIME_BENCH = Path(__file__).with_name("runtime.py")
SERVERS = ("edge_lora", "llamacpp")
HEALTH_TIMEOUT_S = 600.0  # loading the reference export on a busy machine takes tens of seconds
N_CTX = 512  # llama.cpp's context: prompt + new tokens with room to spare


def bench_runtime():
    """bench/runtime.py as a module (bench/ is not a package): its shapes, artifact names and build functions."""
    spec = importlib.util.spec_from_file_location("bench_runtime", RUNTIME_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_step(args) -> str:
    """bench/runtime.py's name for the export edge-lora serves."""
    return "edge_lora_builder" if args.graph == "builder" else "edge_lora"


def build_artifacts(rt, work: Path, args) -> None:
    """The base, adapter, edge-lora int4 export and Q4_0 GGUF, each built by bench/runtime.py unless cached."""
    work.mkdir(parents=True, exist_ok=True)
    rt.name_artifacts(args.int4_block_size)
    for step in ("base", "adapter", export_step(args), "gguf"):
        if (work / rt.ARTIFACTS[step]).exists():
            continue
        t0 = time.perf_counter()
        rt.build_step(step, work, args)
        print(f"built {step:10} {time.perf_counter() - t0:6.1f} s  → {work / rt.ARTIFACTS[step]}", flush=True)


def prompt_texts(tokenizer_json: Path, count: int, tokens: int, seed: int) -> tuple[list[str], list[int]]:
    """`count` texts of random lower-case words, each the shortest run of words of at least `tokens` tokens
    under the export's tokenizer (the same byte-level BPE llama.cpp's GGUF carries), and their token counts."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    rng = random.Random(seed)
    texts, lengths = [], []
    for _ in range(count):
        words: list[str] = []
        while (n := len(tokenizer.encode(" ".join(words)).ids) if words else 0) < tokens:
            words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
        texts.append(" ".join(words))
        lengths.append(n)
    return texts, lengths


# ------------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    health_path: str
    forced: dict
    """Fields that make this server generate exactly max_tokens (no end-of-sequence stop)."""
    log: Path

    def cpu_s(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"{self.name} server exited with {self.proc.returncode} while starting:\n"
                    f"{self.log.read_text()[-4000:]}"
                )
            try:
                if httpx.get(self.url + self.health_path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} server not ready after {HEALTH_TIMEOUT_S:.0f} s; log: {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, work: Path, rt, args) -> Server:
    port = free_port()
    if name == "edge_lora":
        cmd = [
            sys.executable,
            "-m",
            "edge_lora",
            "serve",
            str(work / rt.ARTIFACTS[export_step(args)]),
            "--port",
            str(port),
            "--workers",
            str(args.workers),
            "--threads",
            str(args.threads // args.workers),
            "--queue-timeout",
            "600",
        ]
        health, forced = "/health", {"ignore_eos": True}
    else:
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(work / rt.ARTIFACTS["gguf"]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            str(args.threads),
            "--n_threads_batch",
            str(args.threads),
            "--n_ctx",
            str(N_CTX),
            "--interrupt_requests",
            "False",
            "--verbose",
            "False",
        ]
        health, forced = "/v1/models", {"min_tokens": args.max_tokens}
    log = work / f"serve-{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return Server(name, proc, f"http://127.0.0.1:{port}", health, forced, log)


# -------------------------------------------------------------------------------------------------- client


async def one_request(client, server: Server, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: time to first text chunk, total latency, and how the stream ended."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **server.forced}
    t0 = time.perf_counter_ns()
    first, finish, error = None, None, None
    async with client.stream("POST", server.url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
        else:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue  # blank separators, and llama.cpp's ": ping" comments
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"].get("message", str(chunk["error"]))
                    break
                choice = chunk["choices"][0]
                if first is None and choice.get("text"):
                    first = time.perf_counter_ns()
                finish = choice.get("finish_reason") or finish
    end = time.perf_counter_ns()
    if error is None and finish != "length":
        error = f"stream ended with finish_reason {finish!r}, not 'length' ({max_tokens} tokens)"
    if error is None and first is None:
        error = "no chunk carried text"
    return {"ttft_s": (first - t0) / 1e9 if first else None, "latency_s": (end - t0) / 1e9, "error": error}


async def drive(server: Server, prompts: list[str], concurrency: int, max_tokens: int) -> list[dict]:
    """`concurrency` clients, each sending its next prompt as soon as its last answer has ended."""
    import httpx

    queue = iter(prompts)
    samples: list[dict] = []

    async def client_loop(client):
        for prompt in queue:  # one shared iterator: each prompt is taken once
            samples.append(await one_request(client, server, prompt, max_tokens))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return samples


def run_block(servers: dict[str, Server], name: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    load0, cpu0 = os.getloadavg()[0], {s: servers[s].cpu_s() for s in servers}
    t0 = time.perf_counter_ns()
    samples = asyncio.run(drive(servers[name], prompts, concurrency, max_tokens))
    wall = (time.perf_counter_ns() - t0) / 1e9
    cpu = {s: servers[s].cpu_s() - cpu0[s] for s in servers}
    return {
        "server": name,
        "concurrency": concurrency,
        "wall_s": wall,
        "samples": samples,
        "cpu_over_wall": {s: cpu[s] / wall for s in servers},
        "loadavg_1min": [load0, os.getloadavg()[0]],
    }


def warm_up(server: Server, prompts: list[str], max_tokens: int) -> int:
    """Untimed requests, one at a time; returns the prompt tokens the server counted for the first prompt."""
    import httpx

    body = {"prompt": prompts[0], "max_tokens": 1, "temperature": 0}
    answer = httpx.post(server.url + "/v1/completions", json=body, timeout=300).json()
    for sample in asyncio.run(drive(server, prompts, 1, max_tokens)):
        if sample["error"]:
            raise SystemExit(f"{server.name} warm-up request failed: {sample['error']}; log: {server.log}")
    return answer["usage"]["prompt_tokens"]


# ------------------------------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))  # linear interpolation between the closest ranks


def summarize(blocks: list[dict], threads: int, max_tokens: int) -> dict:
    samples = [x for b in blocks for x in b["samples"]]
    ok = [x for x in samples if x["error"] is None]
    wall = sum(b["wall_s"] for b in blocks)
    ttft, latency = [x["ttft_s"] for x in ok], [x["latency_s"] for x in ok]
    name = blocks[0]["server"]
    cpu = sum(b["cpu_over_wall"][name] * b["wall_s"] for b in blocks)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "rps": len(ok) / wall,
        "tok_s": len(ok) * max_tokens / wall,
        "ttft_p50_s": percentile(ttft, 50) if ok else None,
        "ttft_p99_s": percentile(ttft, 99) if ok else None,
        "latency_p50_s": percentile(latency, 50) if ok else None,
        "latency_p99_s": percentile(latency, 99) if ok else None,
        # CPU ÷ (threads × wall) over the blocks: 1 when the server kept every thread busy the whole time
        "cpu_share": cpu / (threads * wall),
        # the server's CPU seconds per answered request: what a request costs, less sensitive to load than wall time
        "cpu_s_per_request": cpu / len(ok) if ok else None,
        "first_errors": sorted({x["error"] for x in samples if x["error"]})[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model instead of the reference shape")
    parser.add_argument(
        "--workdir",
        default="/tmp/edge-lora-bench-runtime",
        help="bench/runtime.py's artifact cache (built there if missing)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads per server: llama.cpp's n_threads, edge-lora's workers × threads per worker",
    )
    parser.add_argument("--workers", type=int, default=1, help="edge-lora generation workers (threads / workers each)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument(
        "--requests",
        type=int,
        default=16,
        help="requests per server and level, at least --requests-per-client × clients",
    )
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (forced)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per server")
    parser.add_argument(
        "--graph",
        choices=("builder", "torch"),
        default="builder",
        help="the export edge-lora serves: --graph builder (what --device cpu-x86-64 writes for a "
        "Llama) or torch's exporter's graph",
    )
    parser.add_argument(
        "--int4-block-size",
        type=int,
        default=64,
        choices=(16, 32, 64, 128),
        help="as bench/runtime.py's (the CPU device profiles' 64 by default)",
    )
    parser.add_argument("--llama-cpp-src", help="a llama.cpp tree with convert_hf_to_gguf.py (default: from the sdist)")
    args = parser.parse_args()
    if args.threads < 1 or args.workers < 1 or args.threads % args.workers:
        parser.error(
            f"--threads {args.threads} must be a positive multiple of --workers {args.workers} (edge-lora "
            "gets threads / workers per worker, so that both servers use the same threads)"
        )
    missing = [m for m in ("llama_cpp", "sse_starlette", "starlette_context") if importlib.util.find_spec(m) is None]
    if missing:
        parser.error(
            f"the llama.cpp server needs {', '.join(missing)}, not installed — run `make bench-deps` (it builds "
            "llama.cpp from source, about 8 min)"
        )
    levels = [int(c) for c in args.concurrency.split(",")]

    rt = bench_runtime()
    shape_name = "quick" if args.quick else "smollm2-135m"
    work = Path(args.workdir) / shape_name
    build_artifacts(rt, work, args)

    per_level = {c: max(args.requests, args.requests_per_client * c) for c in levels}
    texts, lengths = prompt_texts(
        work / rt.ARTIFACTS[export_step(args)] / "tokenizer.json",
        args.warmup + sum(per_level.values()),
        args.prompt_tokens,
        seed=0,
    )
    warm, texts = texts[: args.warmup], texts[args.warmup :]

    servers: dict[str, Server] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    try:
        for name in SERVERS:  # one after the other, so that neither loads while the other warms up
            t0 = time.perf_counter()
            servers[name] = start(name, work, rt, args)
            servers[name].wait_ready()
            counted = warm_up(servers[name], warm, args.max_tokens)
            print(
                f"ready {name:9} {time.perf_counter() - t0:6.1f} s (load + {args.warmup} warm-up requests); "
                f"it counts {counted} prompt tokens where the tokenizer says {lengths[0]}",
                flush=True,
            )
            if counted != lengths[0]:
                raise SystemExit(
                    f"{name} tokenizes the prompt to {counted} tokens, the export's tokenizer to "
                    f"{lengths[0]}: the servers would not get the same work"
                )

        blocks: dict[tuple[str, int], list[dict]] = {}
        start_at = 0
        for i, c in enumerate(levels):
            prompts = texts[start_at : start_at + per_level[c]]
            start_at += per_level[c]
            halves = [prompts[: len(prompts) // 2], prompts[len(prompts) // 2 :]]
            a, b = SERVERS if i % 2 == 0 else SERVERS[::-1]
            for name, half in ((a, halves[0]), (b, halves[0]), (b, halves[1]), (a, halves[1])):  # A B B A
                block = run_block(servers, name, half, c, args.max_tokens)
                blocks.setdefault((name, c), []).append(block)
                ok = [x for x in block["samples"] if x["error"] is None]
                ttft = sorted(x["ttft_s"] for x in ok)
                print(
                    f"c={c:<3} {name:9} {len(ok):3}/{len(half)} ok  {len(ok) / block['wall_s']:6.2f} req/s  "
                    f"TTFT p50 {percentile(ttft, 50) if ok else float('nan'):7.3f} s  "
                    f"cpu/wall {block['cpu_over_wall'][name]:.2f} "
                    f"(other {block['cpu_over_wall'][b if name == a else a]:.2f})"
                    f"  load {block['loadavg_1min'][0]:.2f}→{block['loadavg_1min'][1]:.2f}",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()

    results = {name: {c: summarize(blocks[name, c], args.threads, args.max_tokens) for c in levels} for name in SERVERS}
    loads = [x for bs in blocks.values() for b in bs for x in b["loadavg_1min"]]
    raw = work / f"serve-samples-{args.threads}threads-{args.workers}workers.json"
    raw.write_text(
        json.dumps(
            {"args": vars(args), "prompt_tokens": lengths, "blocks": [b for bs in blocks.values() for b in bs]},
            indent=1,
        )
    )

    print(
        f"\n{'server':9} {'clients':>7} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'lat p50':>8} {'lat p99':>8} {'errors':>6} {'cpu share':>9} {'cpu s/req':>9}"
    )
    for c in levels:
        for name in SERVERS:
            r = results[name][c]
            print(
                f"{name:9} {c:7} {r['rps']:7.2f} {r['tok_s']:7.1f} {r['ttft_p50_s'] or 0:9.3f} "
                f"{r['ttft_p99_s'] or 0:9.3f} "
                f"{r['latency_p50_s'] or 0:8.3f} {r['latency_p99_s'] or 0:8.3f} {r['errors']:6} {r['cpu_share']:9.2f} "
                f"{r['cpu_s_per_request'] or 0:9.3f}"
            )
    print(f"raw samples: {raw}; load average during blocks {min(loads):.2f}–{max(loads):.2f}")

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    edge, llama = results["edge_lora"], results["llamacpp"]
    ratios = {}
    for c in levels:
        ratios[f"vs_llamacpp_rps_c{c}"] = ratio(edge[c]["rps"], llama[c]["rps"])
        ratios[f"vs_llamacpp_ttft_p50_c{c}"] = ratio(edge[c]["ttft_p50_s"], llama[c]["ttft_p50_s"])
        ratios[f"vs_llamacpp_ttft_p99_c{c}"] = ratio(edge[c]["ttft_p99_s"], llama[c]["ttft_p99_s"])
        ratios[f"vs_llamacpp_latency_p99_c{c}"] = ratio(edge[c]["latency_p99_s"], llama[c]["latency_p99_s"])
        ratios[f"vs_llamacpp_cpu_per_request_c{c}"] = ratio(edge[c]["cpu_s_per_request"], llama[c]["cpu_s_per_request"])
    # The target: requests/s at least llama.cpp's and p99 TTFT at most llama.cpp's, at every level.
    target = all(
        (ratios[f"vs_llamacpp_rps_c{c}"] or 0) >= 1 and (ratios[f"vs_llamacpp_ttft_p99_c{c}"] or 9) <= 1 for c in levels
    )
    keep = (
        "rps",
        "tok_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "latency_p50_s",
        "latency_p99_s",
        "cpu_share",
        "cpu_s_per_request",
    )
    summary = {
        "shape": shape_name,
        "edge_lora_graph": args.graph,
        "edge_lora_int4_block_size": args.int4_block_size,
        "threads": args.threads,
        "edge_lora_workers": args.workers,
        "prompt_tokens_mean": round(float(np.mean(lengths)), 1),
        "max_tokens": args.max_tokens,
        "requests_per_level": {str(c): per_level[c] for c in levels},
        **{
            f"{name}_c{c}": {k: round(v, 4) for k, v in results[name][c].items() if k in keep and v is not None}
            for name in SERVERS
            for c in levels
        },
        "errors": {name: sum(results[name][c]["errors"] for c in levels) for name in SERVERS},
        **ratios,
        "target_met": target,
        "loadavg_1min_min_max": [round(min(loads), 2), round(max(loads), 2)],
        "machine": rt.describe_machine(),
        "quick": args.quick,
    }
    for name in SERVERS:
        for c in levels:
            if results[name][c]["errors"]:
                print(
                    f"{name} c={c}: {results[name][c]['errors']} failed requests, e.g. "
                    f"{results[name][c]['first_errors']}",
                    file=sys.stderr,
                )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
