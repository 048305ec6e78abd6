"""Roll-out on a device: load a new version of an adapter while serving, and roll it back, without a restart.

    GET  /admin/adapters                   every adapter: its live version and those a rollback goes back through
    POST /admin/adapters/{name}            body: the bytes of an .onnx_adapter file; validated, then made live
    POST /admin/adapters/{name}/rollback   the version before the live one goes live again

A new version arrives as the bytes of its file, not as a path on the server: the public API never names a file
on disk, and neither does this one, so a push from a CI machine needs no shell on the device and no shared
directory, and a request cannot make the server read a file it chose. onnxruntime's Python API loads a
LoraAdapter from a path only (it memory-maps the file; the C API's CreateLoraAdapterFromArray has no Python
binding in 1.32), so the bytes are streamed into a directory of the server's own, under a name the server
chooses, and hashed on the way: the version is the sha256's first characters, as for the export's own files.

A version goes live only once onnxruntime reads it as an adapter, each of its tensors is one of this graph's LoRA
inputs with the graph's type and shape (ranks free, A and B agreeing), every value is finite, and one forward
pass with it active gives finite logits; otherwise the answer is 422 and the live version stays. An adapter
trained on another base that happens to have the same shapes cannot be told apart here: its lineage can
(edge-lora inspect). Requests already running keep the version they started with (serve.registry).

Admin endpoints need the API key; a server started without one answers them 404, as if they did not exist, so
that a server on an open port cannot have its model replaced by whoever reaches it. Their bodies have a limit
of their own (--admin-max-body-bytes), much larger than a prompt's.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_lora.formats import ADAPTER_SUFFIX
from edge_lora.runtime.load import first_line
from edge_lora.runtime.lora import Adapter, map_tensors
from edge_lora.runtime.serve.gate import Gate
from edge_lora.runtime.serve.metrics import ServerMetrics
from edge_lora.runtime.serve.registry import VERSION_CHARS, ModelEntry, ModelRegistry
from edge_lora.runtime.serve.schema import APIError

log = logging.getLogger("edge_lora.serve")

LORA_SIDES = ("lora_A", "lora_B")  # graph input names end .lora_A (in, rank) and .lora_B (rank, out)


class AdminGate(Gate):
    """The gate for /admin/: the same key check, and a body limit that names its own setting."""

    def too_large(self, size: str) -> APIError:
        return APIError(
            413,
            f"adapter upload of {size} bytes is over the limit of {self.max_body_bytes} — start the "
            "server with a larger --admin-max-body-bytes",
            "body_too_large",
        )


class Gates:
    """The outermost middleware: the admin gate for /admin/ paths, the public gate for the rest."""

    def __init__(
        self, app: ASGIApp, metrics: ServerMetrics, api_key: str | None, max_body_bytes: int, admin_max_body_bytes: int
    ):
        self.public = Gate(app, metrics, api_key, max_body_bytes)
        self.admin = AdminGate(app, metrics, api_key, admin_max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admin = scope["type"] == "http" and scope["path"].startswith("/admin/")
        await (self.admin if admin else self.public)(scope, receive, send)


class AdapterStore:
    """The server's directory for uploaded versions: made at the first upload, removed when the server stops."""

    def __init__(self):
        self.dir: Path | None = None
        """None until the first upload."""
        self._count = itertools.count(1)

    async def receive(self, chunks: AsyncIterator[bytes]) -> tuple[Path, str]:
        """Write an upload to a file of the store; returns its path and version."""
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="edge-lora-adapters-"))
        part = self.dir / f"{next(self._count):06d}.part"
        digest, size = hashlib.sha256(), 0
        try:
            with part.open("wb") as f:
                async for chunk in chunks:  # at most 64 KiB each; written on the loop, as a page-cache copy is quick
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except BaseException:  # the body limit, or the client left
            part.unlink(missing_ok=True)
            raise
        if size == 0:
            part.unlink()
            raise APIError(
                422,
                "the body is empty — send the bytes of an .onnx_adapter file (for example curl "
                "--data-binary @adapters/NAME.onnx_adapter)",
                "empty_adapter",
            )
        version = digest.hexdigest()[:VERSION_CHARS]
        return part.rename(part.with_name(f"{part.stem}-{version}{ADAPTER_SUFFIX}")), version

    def discard(self, path: Path | None) -> None:
        """Delete an uploaded version's file. Requests still running on it keep reading their memory map (POSIX);
        where the file cannot go yet (Windows maps lock it), it goes with the directory at shutdown."""
        if path is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


class PortableInput(NamedTuple):
    """A LoRA input of the portable graph as export.json records it, shaped like an onnxruntime NodeArg."""

    name: str
    type: str
    shape: list


def lora_inputs(generator) -> dict:
    """The LoRA inputs an uploaded adapter must fit, by name (with .type and .shape): the session's overridable
    initializers, which get_inputs() leaves out — or, where the session runs a kernel's graph, the portable
    graph's from export.json (uploads come in that form and are converted: lora.Adapter.tensors_for)."""
    if generator.kernel is None:
        return {
            i.name: i
            for i in generator.session.get_overridable_initializers()
            if i.name.rpartition(".")[2] in LORA_SIDES
        }
    types = {"float32": "tensor(float)", "float16": "tensor(float16)"}
    return {
        i["name"]: PortableInput(i["name"], types.get(i["dtype"], i["dtype"]), i["shape"])
        for i in generator.export.manifest.inputs
        if i["name"].rpartition(".")[2] in LORA_SIDES
    }


def fit_problems(tensors: dict, inputs: dict) -> list[str]:
    """What keeps an adapter's tensors ({name: OrtValue}) from feeding these LoRA inputs ({name: NodeArg})."""
    if not tensors:
        return ["it holds no tensors"]
    problems = []
    for name, value in sorted(tensors.items()):
        graph_input = inputs.get(name)
        module, _, side = name.rpartition(".")
        partner = f"{module}.{LORA_SIDES[side == 'lora_A']}"
        shape = value.shape()
        expected = [d if isinstance(d, int) else "rank" for d in graph_input.shape] if graph_input else None
        if graph_input is None:
            problems.append(f"{name} is not a LoRA input of this model")
        elif value.data_type() != graph_input.type:
            problems.append(f"{name} is {value.data_type()}, the model takes {graph_input.type}")
        elif len(shape) != 2 or any(e != "rank" and e != s for e, s in zip(expected, shape)):
            problems.append(f"{name} has shape {shape}, the model takes {expected}")
        elif partner not in tensors:
            problems.append(f"{name} comes without {partner}")
        elif side == "lora_A" and shape[1] != tensors[partner].shape()[0]:
            problems.append(f"{name} has rank {shape[1]}, {partner} rank {tensors[partner].shape()[0]}")
        elif not np.isfinite(value.numpy()).all():
            problems.append(f"{name} holds NaN or inf")
    return problems


def validated(registry: ModelRegistry, name: str, version: str, path: Path) -> ModelEntry:
    """The entry of an uploaded version, once it is known to fit this model (see the module's docstring);
    raises APIError 422 otherwise. Runs on a worker thread: it maps the file and runs the model once."""

    def refused(reason: str) -> APIError:
        live = registry.adapter(name).version
        return APIError(
            422,
            f"version {version} of adapter {name!r} was refused and {live} stays live: {reason} — "
            "send the .onnx_adapter that 'edge-lora export --flavor adapters' wrote for an adapter "
            "trained on this base",
            "invalid_adapter",
        )

    try:
        tensors = map_tensors(path)
    except RuntimeError as e:  # onnxruntime's message ends with what was wrong, after its source location
        reason = str(e).strip().rpartition(") ")[2][:120]
        raise refused(f"onnxruntime cannot read it as an adapter ({reason})") from None
    problems = fit_problems(tensors, lora_inputs(registry.generator))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise refused("; ".join(problems[:3]) + more)
    entry = ModelEntry(name, version, Adapter(path, tensors), path)
    try:
        logits = registry.view(entry).logits([0])  # (1, vocab) for one token: any id of the vocabulary does
    except Exception as e:  # onnxruntime's errors have no common base class
        raise refused(f"a forward pass with it failed ({first_line(e, 160)})") from None
    if not np.isfinite(logits).all():
        raise refused("it makes the model's logits NaN or inf")
    return entry


def install_admin(
    app: FastAPI, registry: ModelRegistry, metrics: ServerMetrics, store: AdapterStore, api_key: str | None
) -> None:
    def require_key() -> None:
        if api_key is None:  # with a key, the gate has already checked it
            raise APIError(
                404,
                "admin endpoints are off: this server runs without an API key — restart it with "
                "--api-key (or EDGE_LORA_API_KEY) to load and roll back adapter versions",
                "admin_disabled",
            )

    def described(name: str) -> dict:
        live = registry.adapter(name)
        return {
            "id": name,
            "object": "adapter",
            "version": live.version,
            "model": live.model_id,
            "source": "export" if live.file is None else "upload",
            "rollback_versions": [e.version for e in reversed(registry.earlier(name))],
        }

    @app.get("/admin/adapters")
    async def adapters():
        require_key()
        return {"object": "list", "data": [described(e.name) for e in registry.entries if e.adapter is not None]}

    @app.post("/admin/adapters/{name}")
    async def load_version(name: str, request: Request):
        require_key()
        registry.adapter(name)  # 404 before the body is read
        path, version = await store.receive(request.stream())
        if version == registry.adapter(name).version:
            store.discard(path)
            return {**described(name), "changed": False, "replaced": None}
        try:
            entry = await run_in_threadpool(validated, registry, name, version, path)
        except APIError:
            store.discard(path)
            metrics.adapter_changes.labels(name, "refused").inc()
            raise
        replaced, dropped = registry.promote(entry)
        for old in dropped:
            store.discard(old.file)
        metrics.went_live(name, entry.version, replaced.version)
        metrics.adapter_changes.labels(name, "load").inc()
        log.warning("adapter %s: version %s is live (was %s)", name, entry.version, replaced.version)
        return {**described(name), "changed": True, "replaced": replaced.version}

    @app.post("/admin/adapters/{name}/rollback")
    async def rollback(name: str):
        require_key()
        restored, retired = registry.rollback(name)
        store.discard(retired.file)
        metrics.went_live(name, restored.version, retired.version)
        metrics.adapter_changes.labels(name, "rollback").inc()
        log.warning("adapter %s: rolled back to version %s (was %s)", name, restored.version, retired.version)
        return {**described(name), "changed": True, "replaced": retired.version}
