"""The server's Prometheus metrics, in a registry of its own (one per app, so tests can run several).

prometheus_client writes the text exposition format (escaping, histogram buckets, _sum/_count, TYPE and HELP
lines) and makes counters safe to update from the worker threads; it is pure Python with no dependencies.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; TTFT spans a Raspberry Pi's long prefill as well as a desktop's, per-token times 1 ms to 1 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1)

# Paths a request is counted under; any other path counts as "other", so that probes cannot grow the label set.
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/admin/adapters")
# Admin paths that hold an adapter's name are counted under their route, for the same reason.
ADMIN_ROUTES = {"": "/admin/adapters/{name}", "/rollback": "/admin/adapters/{name}/rollback"}


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edge_lora_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "edge_lora_request_duration_seconds",
            "Request arrival to the last byte of the response.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "edge_lora_time_to_first_token_seconds",
            "Request arrival (queue wait included) to the first new token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "edge_lora_time_per_output_token_seconds",
            "Time of each new token after the first.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "edge_lora_prompt_tokens", "Prompt tokens of the requests that were run.", ["model"], registry=r
        )
        self.generated_tokens = Counter("edge_lora_generated_tokens", "New tokens generated.", ["model"], registry=r)
        self.queue_depth = Gauge("edge_lora_queue_depth", "Requests waiting for a worker.", registry=r)
        self.busy_workers = Gauge("edge_lora_busy_workers", "Workers holding a request.", registry=r)
        self.workers = Gauge("edge_lora_workers", "Generation workers.", registry=r)
        self.active_generations = Gauge(
            "edge_lora_active_generations", "Generations running, by model or adapter.", ["model"], registry=r
        )
        self.models = Gauge(
            "edge_lora_model_info",
            "1 for each model (base and adapters) served, with its live version.",
            ["model", "version"],
            registry=r,
        )
        self.model_requests = Counter(
            "edge_lora_model_requests",
            "Requests run, by model and the version that answered them.",
            ["model", "version"],
            registry=r,
        )
        self.adapter_changes = Counter(
            "edge_lora_adapter_changes",
            "Adapter versions loaded, rolled back, or refused by validation.",
            ["model", "action"],
            registry=r,
        )

    def observe_request(self, path: str, status: int, started: float) -> None:
        endpoint = path if path in ENDPOINTS else admin_route(path)
        self.requests.labels(endpoint, str(status)).inc()
        self.request_seconds.labels(endpoint).observe(time.perf_counter() - started)

    def observe_token(self, model: str, first: bool, seconds: float) -> None:
        """One new token: `seconds` since the request arrived for the first, since the previous token after."""
        self.generated_tokens.labels(model).inc()
        (self.ttft if first else self.tpot).labels(model).observe(seconds)

    def went_live(self, model: str, version: str, replaced: str) -> None:
        """`model`'s live version changed from `replaced` to `version`: model_info names only the live one."""
        self.models.remove(model, replaced)
        self.models.labels(model, version).set(1)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def admin_route(path: str) -> str:
    """The admin route `path` is on ('/admin/adapters/{name}/rollback'), or "other"."""
    name, slash, rest = path.removeprefix("/admin/adapters/").partition("/")
    route = ADMIN_ROUTES.get(slash + rest)
    return route if path.startswith("/admin/adapters/") and name and route else "other"
