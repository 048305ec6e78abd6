"""The models a server offers: its export's base (or merged) model and every adapter, each at one live version.

A request's `model` field is only ever a key into this registry: nothing in a request names a file. Entries are
immutable and held in a dict that is replaced, never changed in place, so a request that has resolved its entry
keeps that version until it is answered while a new one goes live. Loading a new version of an adapter (POST
/admin/adapters/{name}, serve.admin) puts a new entry under the same name and keeps the one it replaces, with its
loaded adapter (lora.Adapter), for rollback: rolling back puts that very entry back, so outputs are restored exactly.

Changes happen on the event loop's thread only (serve.admin), each in one step with no await inside it, so they
need no lock: a request sees the registry before a change or after it, never half of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_lora.runtime.generate import Generator
from edge_lora.runtime.serve.schema import APIError

VERSION_CHARS = 12  # of a sha256, as in git's short ids
ROLLBACK_DEPTH = 4  # earlier versions kept per adapter; each holds its lora.Adapter and file


class ServeError(ValueError):
    """A server that cannot start as asked: bad settings, or an export whose names clash."""


@dataclass(frozen=True)
class ModelEntry:
    """One name a request can ask for, at one version."""

    name: str
    """What GET /v1/models lists and a request's `model` field names."""
    version: str
    """The first characters of the sha256 of what makes this model: the adapter file, or the whole export."""
    adapter: object | None = field(default=None, compare=False, repr=False)
    """The lora.Adapter made active on the shared session; None for the base (or merged) model."""
    file: Path | None = None
    """The server's own copy of an uploaded version (deleted once the version is dropped); None for the export's."""

    @property
    def model_id(self) -> str:
        """What every response names in its `model` field: 'name@version'."""
        return f"{self.name}@{self.version}"


class ModelRegistry:
    def __init__(self, generator: Generator, base_name: str):
        export = generator.export
        entries = {base_name: ModelEntry(base_name, export.digest()[:VERSION_CHARS])}
        for name, adapter in export.manifest.adapters.items():
            if name in entries:
                raise ServeError(
                    f"adapter {name!r} has the name of the base model — serve the export under "
                    "another name (rename its directory)"
                )
            entries[name] = ModelEntry(
                name, export.manifest.files[adapter.file][:VERSION_CHARS], generator.adapters[name]
            )
        self.base_name = base_name
        self.generator = generator
        self._entries = entries
        self._earlier: dict[str, tuple[ModelEntry, ...]] = {}  # by adapter name: versions it replaced, oldest first

    @property
    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def earlier(self, name: str) -> tuple[ModelEntry, ...]:
        """The versions a rollback of adapter `name` goes back through, oldest first."""
        return self._earlier.get(name, ())

    def resolve(self, model: str | None) -> tuple[ModelEntry, Generator]:
        """The entry a request names (None: the base) and a generator view with its adapter active.

        'name@version' is taken too (what responses name), as long as that version is the live one.
        """
        name, version = self.base_name if model is None else model, None
        if name not in self._entries and "@" in name:  # a name of its own may hold an @: it is looked up first
            name, _, version = name.rpartition("@")
        entry = self._entries.get(name)
        if entry is None:
            raise APIError(
                404,
                f"model {model!r} does not exist — use one of: {', '.join(self._entries)} (GET /v1/models lists them)",
                "model_not_found",
                param="model",
            )
        if version is not None and version != entry.version:
            raise APIError(
                404,
                f"model {model!r} is not served: {name} is at version {entry.version} now — ask "
                f"for {name!r} or {entry.model_id!r}",
                "model_version_not_found",
                param="model",
            )
        return entry, self.view(entry)

    def view(self, entry: ModelEntry) -> Generator:
        """A generator on the shared session with `entry`'s adapter active; it keeps the adapter alive while it
        runs (onnxruntime's run options hold no reference of their own)."""
        if entry.adapter is None:
            return self.generator.with_adapter(None)
        return self.generator.with_adapter(entry.name, entry.adapter)

    def adapter(self, name: str) -> ModelEntry:
        """The live entry of adapter `name`, or a 404 that lists the adapters."""
        entry = self._entries.get(name)
        if entry is None or name == self.base_name:
            adapters = [n for n in self._entries if n != self.base_name]
            what = "is the base model, which has no versions to load" if entry else "is not an adapter of this server"
            raise APIError(
                404,
                f"{name!r} {what} — adapters: {', '.join(adapters) or 'none'} (an export made with "
                "--flavor adapters has them)",
                "adapter_not_found",
            )
        return entry

    def promote(self, entry: ModelEntry) -> tuple[ModelEntry, list[ModelEntry]]:
        """Make `entry` the live version of its adapter; returns the one it replaced, and the versions dropped
        past ROLLBACK_DEPTH (their files may go)."""
        replaced = self.adapter(entry.name)
        kept = (*self.earlier(entry.name), replaced)
        self._entries = {**self._entries, entry.name: entry}
        self._earlier = {**self._earlier, entry.name: kept[-ROLLBACK_DEPTH:]}
        return replaced, list(kept[:-ROLLBACK_DEPTH])

    def rollback(self, name: str) -> tuple[ModelEntry, ModelEntry]:
        """Put back the version adapter `name` had before its live one; returns (restored, retired)."""
        live = self.adapter(name)
        if not self.earlier(name):
            raise APIError(
                409,
                f"adapter {name!r} has no earlier version to roll back to: it is at {live.version}, "
                f"the version it started with (the server keeps {ROLLBACK_DEPTH} earlier versions "
                "of those it loads)",
                "nothing_to_roll_back",
            )
        *kept, restored = self.earlier(name)
        self._entries = {**self._entries, name: restored}
        self._earlier = {**self._earlier, name: tuple(kept)}
        return restored, live
