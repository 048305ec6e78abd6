"""`edge-lora serve`: one export and its adapters over OpenAI's HTTP API, on FastAPI and uvicorn (extra `serve`).

    POST /v1/completions, POST /v1/chat/completions   (stream: server-sent events)
    GET  /v1/models, GET /health, GET /metrics         (Prometheus text format)
    GET, POST /admin/adapters...                       (new adapter versions and rollback: serve.admin)

Requests go through the gate (serve.gate: API key, body size, metrics), are validated (serve.schema), resolved
to a model (serve.registry), tokenized and checked against the context on the event loop's thread pool, and then
queued for a generation worker (serve.workers). A bad request is answered before it reaches the model. Every
answer names the model version that produced it (serve.answers), and /metrics counts requests by model and version.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from edge_lora.runtime.chat import ChatError
from edge_lora.runtime.generate import Generator
from edge_lora.runtime.sampling import PromptError, SamplingConfig
from edge_lora.runtime.serve.admin import AdapterStore, Gates, install_admin
from edge_lora.runtime.serve.answers import ChatShape, TextShape, sse, version_header, whole
from edge_lora.runtime.serve.gate import install_error_handlers
from edge_lora.runtime.serve.metrics import ServerMetrics
from edge_lora.runtime.serve.registry import ModelEntry, ModelRegistry, ServeError
from edge_lora.runtime.serve.schema import APIError, ChatRequest, CompletionRequest, SamplingFields
from edge_lora.runtime.serve.workers import Job, WorkerPool

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class ServeConfig:
    """How the server listens, how much work it takes on, and what it refuses."""

    host: str = "127.0.0.1"
    """Address to bind; loopback only unless this says otherwise (0.0.0.0: every interface)."""
    port: int = 8000
    """TCP port; 0 picks a free one."""
    api_key: str | None = None
    """When set, every endpoint but /health needs `Authorization: Bearer <api_key>`; when not, the admin endpoints
    (adapter roll-out, serve.admin) are off."""
    workers: int | None = None
    """Generations that run at once; None: as many as the device profile's threads per worker fit the host's
    physical cores (at least 1)."""
    queue_size: int = 32
    """Requests that may wait for a worker; the next one is answered 429 at once."""
    queue_timeout_s: float = 60.0
    """A request that waits longer than this for a worker is answered 503."""
    retry_after_s: int = 1
    """Retry-After of a 429 or 503, in seconds."""
    max_body_bytes: int = 1 << 20
    """Largest request body; a larger one is answered 413 before it is read."""
    admin_max_body_bytes: int = 1 << 30
    """Largest adapter upload to /admin/adapters/{name} (streamed to disk, not held in memory)."""
    chat_max_tokens: int = 512
    """max_tokens of a chat request that sets none (less where the context has less room left)."""
    grace_s: float = 10.0
    """On SIGTERM: how long in-flight requests may take to finish before they are cancelled."""

    def __post_init__(self):
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port={self.port} must be in 0..65535")
        if self.api_key is not None and (not self.api_key.strip() or not self.api_key.isascii()):
            problems.append("api_key must be non-empty ASCII text (an environment variable set to '' counts as set)")
        if self.workers is not None and self.workers < 1:
            problems.append(f"workers={self.workers} must be >= 1")
        if self.queue_size < 0:
            problems.append(f"queue_size={self.queue_size} must be >= 0 (0: no waiting, 429 when all workers are busy)")
        for name in ("retry_after_s", "max_body_bytes", "admin_max_body_bytes", "chat_max_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("queue_timeout_s", "grace_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)} must be > 0 seconds")
        if problems:
            raise ServeError("serve settings: " + "; ".join(problems))


def create_app(generator: Generator, config: ServeConfig, base_name: str, workers: int) -> FastAPI:
    """The ASGI app serving `generator`'s export under `base_name`, and its adapters under their names."""
    server = ServerState.build(generator, config, base_name, workers)
    app = FastAPI(title="edge-lora", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool, app.state.metrics = server.pool, server.metrics
    app.state.registry, app.state.store = server.registry, server.store
    install_error_handlers(app)
    app.add_middleware(
        Gates,
        metrics=server.metrics,
        api_key=config.api_key,
        max_body_bytes=config.max_body_bytes,
        admin_max_body_bytes=config.admin_max_body_bytes,
    )
    install_admin(app, server.registry, server.metrics, server.store, config.api_key)
    install_status_routes(app, server)
    install_model_routes(app, server)
    return app


@dataclass(frozen=True)
class ServerState:
    """What the endpoints share: the model and its registry, the worker pool, the metrics, the upload store."""

    generator: Generator
    config: ServeConfig
    registry: ModelRegistry
    pool: WorkerPool
    metrics: ServerMetrics
    store: AdapterStore
    workers: int

    @classmethod
    def build(cls, generator: Generator, config: ServeConfig, base_name: str, workers: int) -> ServerState:
        """The registry of the export's models, a pool of `workers`, and metrics that watch both."""
        registry = ModelRegistry(generator, base_name)
        metrics = ServerMetrics()
        pool = WorkerPool(workers, config.queue_size, config.queue_timeout_s, config.retry_after_s)
        metrics.workers.set(workers)
        metrics.queue_depth.set_function(lambda: pool.queue_depth)
        metrics.busy_workers.set_function(lambda: workers - pool.free)
        for entry in registry.entries:
            metrics.models.labels(entry.name, entry.version).set(1)
        return cls(generator, config, registry, pool, metrics, AdapterStore(), workers)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Runs while the app serves; once uvicorn's grace period is over, stops what still runs."""
        yield
        await run_in_threadpool(self.pool.close)
        self.store.close()

    async def answer(
        self,
        request: Request,
        body: SamplingFields,
        entry: ModelEntry,
        view: Generator,
        ids: list[int],
        sampling: SamplingConfig,
        chat: bool,
    ) -> Response:
        """Run the prompt `ids` on a worker; the whole answer, or its stream when the body asks for one."""
        try:
            view.fit_prompt(ids, sampling)  # a prompt too long for the context is refused here, not in a worker
        except PromptError as e:
            raise APIError(400, str(e), "context_length_exceeded", param="max_tokens") from None
        job = await self.start_job(request, entry, view, ids, sampling)
        if job is None:
            return Response(status_code=499)
        shape = ChatShape(entry) if chat else TextShape(entry)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                sse(job, shape, len(ids), include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **version_header(entry)},
            )
        return JSONResponse(await whole(job, shape, len(ids)), headers=version_header(entry))

    async def start_job(
        self, request: Request, entry: ModelEntry, view: Generator, ids: list[int], sampling: SamplingConfig
    ) -> Job | None:
        """Wait for a worker and start the generation on it; None when the client left while it waited."""
        arrived = time.perf_counter()
        await self.pool.acquire()
        try:
            job = Job(view, ids, sampling, entry.name, self.metrics, arrived, asyncio.get_running_loop())
            if await request.is_disconnected():  # it left while queued: give the worker to the next one
                self.pool.release()
                return None
            self.metrics.prompt_tokens.labels(entry.name).inc(len(ids))
            self.metrics.model_requests.labels(entry.name, entry.version).inc()
            self.pool.start(job)
        except BaseException:
            self.pool.release()
            raise
        return job


def install_status_routes(app: FastAPI, server: ServerState) -> None:
    """GET /health (503 once the server is stopping) and GET /metrics (Prometheus text format)."""
    pool, workers = server.pool, server.workers

    @app.get("/health")
    async def health():
        body = {
            "status": "stopping" if pool.closed else "ok",
            "workers": workers,
            "busy": workers - pool.free,
            "queued": pool.queue_depth,
        }
        return JSONResponse(body, status_code=503 if pool.closed else 200)

    @app.get("/metrics")
    async def prometheus():
        content, content_type = server.metrics.exposition()
        return Response(content, media_type=content_type)


def install_model_routes(app: FastAPI, server: ServerState) -> None:
    """GET /v1/models, POST /v1/completions and POST /v1/chat/completions."""
    generator, registry = server.generator, server.registry

    @app.get("/v1/models")
    async def models():
        created = int(generator.export.model_path.stat().st_mtime)
        return {
            "object": "list",
            "data": [
                {
                    "id": e.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "edge-lora",
                    "version": e.version,
                    "parent": None if e.adapter is None else registry.base_name,
                }
                for e in registry.entries
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        entry, view = registry.resolve(body.model)
        text = checked_text(body.prompt_text(), "prompt")
        ids = await run_in_threadpool(prompt_ids, lambda: view.encode_prompt(text))
        sampling = sampling_config(body, body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS)
        return await server.answer(request, body, entry, view, ids, sampling, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        entry, view = registry.resolve(body.model)
        if view.chat_template is None:
            raise APIError(
                400,
                f"model {entry.name!r} has no chat template (its tokenizer_config.json has none) — "
                "use /v1/completions with a prompt",
                "no_chat_template",
                param="messages",
            )
        messages = [m.as_template_input() for m in body.messages]
        for i, m in enumerate(messages):
            checked_text(m["content"], f"messages[{i}].content")
        ids = await run_in_threadpool(prompt_ids, lambda: view.render_chat(messages))
        room = generator.context_length - len(ids)
        sampling = sampling_config(body, body.max_tokens or max(1, min(server.config.chat_max_tokens, room)))
        return await server.answer(request, body, entry, view, ids, sampling, chat=True)


def checked_text(text: str, param: str) -> str:
    """`text`, if it can be encoded as UTF-8: JSON lets a lone surrogate (\\ud800) through, the tokenizer does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400,
            f"{param} holds a lone surrogate ({text[e.start : e.end]!r} at character {e.start}) — send "
            "valid Unicode text",
            "invalid_text",
            param=param.partition("[")[0],
        ) from None
    return text


def prompt_ids(render: Callable[[], list[int]]) -> list[int]:
    """Prompt ids from a tokenizing call, with the runtime's refusals turned into 400s."""
    try:
        return render()
    except ChatError as e:
        raise APIError(400, str(e), "invalid_messages", param="messages") from None
    except PromptError as e:
        raise APIError(400, str(e), "invalid_prompt", param="prompt") from None


def sampling_config(body: SamplingFields, max_tokens: int) -> SamplingConfig:
    try:
        return SamplingConfig(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            repetition_penalty=body.repetition_penalty,
            stop=body.stop_strings(),
        )
    except PromptError as e:
        raise APIError(400, str(e), "invalid_sampling") from None


def serve(
    export_dir: str | Path, config: ServeConfig = ServeConfig(), device: str | None = None, threads: int | None = None
) -> None:
    """Load the export and serve it until SIGTERM or Ctrl-C; returns once in-flight work is done or cancelled.

    The base model is served under the export directory's name. Threads per worker come from `threads`, else the
    device profile (0: one per physical core); workers from config.workers, else as many as the cores hold.
    """
    import psutil
    import uvicorn

    from edge_lora.runtime import device_profile, load, open_export

    profile = device_profile(open_export(export_dir, verify=False), device)
    cores = psutil.cpu_count(logical=False) or 1
    threads = profile.intra_op_threads if threads is None else threads
    workers = config.workers or max(1, cores // (threads or cores))
    generator = load(export_dir, device=device, threads=threads)
    app = create_app(generator, config, Path(export_dir).resolve().name, workers)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.pool.closed = True  # new requests get 503 while in-flight ones finish
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            timeout_graceful_shutdown=config.grace_s,
            access_log=False,
            log_level="info",
        )
    )
    # uvicorn raises a SIGTERM it caught again once it has shut down, to the handler installed before it ran,
    # so that the default one would end the process "killed by SIGTERM". A graceful stop is this command's
    # normal end (exit status 0): the handler in place while it runs ignores that second delivery.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
