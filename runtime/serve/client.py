"""The client side of a roll-out (`edge-lora serve-admin`): push an adapter version to a running server, roll it
back, list what it serves. Standard library only (urllib), so that it runs wherever the CLI does, with or without
the `serve` extra; the endpoints are in edge_lora.runtime.serve.admin.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

TIMEOUT_S = 120.0  # a push waits for the server to validate the adapter with a forward pass


class AdminClientError(ValueError):
    """The server refused, or could not be reached; the message is one line that says why and what to do."""


def push(url: str, name: str, adapter_file: str | Path, api_key: str | None) -> dict:
    """Upload `adapter_file` as the next version of adapter `name`; the server's description of it once live."""
    path = Path(adapter_file)
    if not path.is_file():
        raise AdminClientError(
            f"{path} is not a file — pass the .onnx_adapter file that 'edge-lora export --flavor "
            "adapters' wrote (in the export's adapters/ dir)"
        )
    return call(url, f"/admin/adapters/{quoted(name)}", api_key, body=path.read_bytes())


def rollback(url: str, name: str, api_key: str | None) -> dict:
    """Put back the version adapter `name` had before its live one."""
    return call(url, f"/admin/adapters/{quoted(name)}/rollback", api_key, body=b"")


def adapters(url: str, api_key: str | None) -> dict:
    """Every adapter of the server with its live version and the versions a rollback goes back through."""
    return call(url, "/admin/adapters", api_key)


def quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")  # a name is one path segment, whatever it holds


def call(url: str, path: str, api_key: str | None, body: bytes | None = None) -> dict:
    if not url.startswith(("http://", "https://")):
        raise AdminClientError(
            f"server URL {url!r} does not start with http:// or https:// — for example http://127.0.0.1:8000"
        )
    headers = {"Content-Type": "application/octet-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url.rstrip("/") + path, data=body, headers=headers, method="GET" if body is None else "POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise AdminClientError(f"the server answered {e.code}: {server_message(e)}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AdminClientError(f"cannot reach {url} ({reason}) — is 'edge-lora serve' running there?") from None


def server_message(error: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-shaped error body, or the start of whatever else came back."""
    raw = error.read()
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace").strip()[:200] or error.reason
