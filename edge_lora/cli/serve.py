"""`edge-lora serve`: an export over OpenAI's HTTP API; `edge-lora serve-admin`: adapter roll-outs on it."""

from __future__ import annotations

import json
from collections.abc import Callable

import click

from edge_lora.errors import UsageError


@click.command("serve")
@click.argument("export_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--api-key",
    default=None,
    envvar="EDGE_LORA_API_KEY",
    help="Require 'Authorization: Bearer KEY' on every endpoint but /health [env: EDGE_LORA_API_KEY].",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Generations at once [default: the host's physical cores / threads per worker, at least 1].",
)
@click.option(
    "--queue-size",
    type=int,
    default=32,
    show_default=True,
    help="Requests that may wait for a worker; one more is answered 429.",
)
@click.option(
    "--queue-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds a request may wait for a worker before it is answered 503.",
)
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True, help="Larger bodies get 413.")
@click.option(
    "--admin-max-body-bytes",
    type=int,
    default=1 << 30,
    show_default=True,
    help="Largest adapter upload to /admin/adapters/NAME (see 'edge-lora serve-admin').",
)
@click.option(
    "--grace-period",
    type=float,
    default=10.0,
    show_default=True,
    help="On SIGTERM, seconds in-flight requests may take to finish before they are cancelled.",
)
@click.option("--device", default=None, help="Device profile for providers and threads.")
@click.option("--threads", type=int, default=None, help="Intra-op threads per worker (0: one per physical core).")
def serve(
    export_dir: str,
    host: str,
    port: int,
    api_key: str | None,
    workers: int | None,
    queue_size: int,
    queue_timeout: float,
    max_body_bytes: int,
    admin_max_body_bytes: int,
    grace_period: float,
    device: str | None,
    threads: int | None,
) -> None:
    """Serve an export (and its adapters) over OpenAI's HTTP API: /v1/completions, /v1/chat/completions,
    /v1/models, /health and /metrics. Needs the extra: pip install 'edge-lora[serve]'. With --api-key, adapter
    versions can be loaded and rolled back while serving (see 'edge-lora serve-admin').

    \b
    Example:  edge-lora serve demo-out/export-int4 --port 8000
              curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
                   -d '{"model": "export-int4", "prompt": "2024-03-17 ->", "max_tokens": 16}'
    """
    try:
        from edge_lora.runtime.serve.app import ServeConfig, ServeError
        from edge_lora.runtime.serve.app import serve as run_server
    except ImportError as e:
        raise UsageError(f"serving needs FastAPI and uvicorn ({e}) — pip install 'edge-lora[serve]'") from None
    try:
        config = ServeConfig(
            host=host,
            port=port,
            api_key=api_key,
            workers=workers,
            queue_size=queue_size,
            queue_timeout_s=queue_timeout,
            max_body_bytes=max_body_bytes,
            admin_max_body_bytes=admin_max_body_bytes,
            grace_s=grace_period,
        )
        run_server(export_dir, config, device=device, threads=threads)
    except ServeError as e:
        raise UsageError(str(e)) from None


@click.group("serve-admin")
def serve_admin() -> None:
    """Roll out adapter versions on a running 'edge-lora serve' (started with --api-key): push a new version,
    roll back to the one before, list what is live. Every response of the server names the version that
    produced it (the X-Model-Version header and the model field, 'name@version').

    \b
    Example:  edge-lora serve-admin push http://device:8000 my-adapter new-export/adapters/my-adapter.onnx_adapter
              edge-lora serve-admin rollback http://device:8000 my-adapter
    """


def admin_call(call: Callable[..., dict], *args) -> None:
    """Print what the admin client's `call` returns, as JSON; its refusal is one line, exit 2."""
    from edge_lora.runtime.serve.client import AdminClientError

    try:
        click.echo(json.dumps(call(*args), indent=2))
    except AdminClientError as e:
        raise UsageError(str(e)) from None


API_KEY_OPTION = click.option(
    "--api-key", default=None, envvar="EDGE_LORA_API_KEY", help="The server's API key [env: EDGE_LORA_API_KEY]."
)


@serve_admin.command("push")
@click.argument("url")
@click.argument("name")
@click.argument("adapter_file", type=click.Path())
@API_KEY_OPTION
def serve_admin_push(url: str, name: str, adapter_file: str, api_key: str | None) -> None:
    """Upload ADAPTER_FILE (.onnx_adapter) as the next version of adapter NAME; the server checks it against its
    model (422, and the live version stays, if it does not fit) and keeps the version it replaces for rollback.

    \b
    Example:  edge-lora serve-admin push http://127.0.0.1:8000 my-adapter v2/adapters/my-adapter.onnx_adapter
    """
    from edge_lora.runtime.serve.client import push

    admin_call(push, url, name, adapter_file, api_key)


@serve_admin.command("rollback")
@click.argument("url")
@click.argument("name")
@API_KEY_OPTION
def serve_admin_rollback(url: str, name: str, api_key: str | None) -> None:
    """Put back the version adapter NAME had before its live one (the same weights, so the same outputs).

    \b
    Example:  edge-lora serve-admin rollback http://127.0.0.1:8000 my-adapter
    """
    from edge_lora.runtime.serve.client import rollback

    admin_call(rollback, url, name, api_key)


@serve_admin.command("list")
@click.argument("url")
@API_KEY_OPTION
def serve_admin_list(url: str, api_key: str | None) -> None:
    """Every adapter the server at URL serves: its live version and those a rollback goes back through.

    \b
    Example:  edge-lora serve-admin list http://127.0.0.1:8000
    """
    from edge_lora.runtime.serve.client import adapters

    admin_call(adapters, url, api_key)
