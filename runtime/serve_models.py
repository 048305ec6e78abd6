"""The models a server offers: its export's base (or merged) model and every adapter, each with a version.

A request's `model` field is only ever a key into this registry: nothing in a request names a file.
Entries are held in a dict that is replaced, never changed in place, so a request that has resolved its entry
keeps it while the set of models changes; loading an adapter version at run time and rolling it back (issue 8)
is a new entry under the same name, and the previous entry kept for the rollback.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_lora.runtime.generate import Generator
from edge_lora.runtime.serve_schema import APIError

VERSION_CHARS = 12  # of a sha256, as in git's short ids


class ServeError(ValueError):
    """A server that cannot start as asked: bad settings, or an export whose names clash."""


@dataclass(frozen=True)
class ModelEntry:
    """One name a request can ask for."""

    name: str
    """What GET /v1/models lists and a request's `model` field names."""
    adapter: str | None
    """The adapter made active on the shared session; None for the base (or merged) model."""
    version: str
    """The first characters of the sha256 of what makes this model: the adapter file, or the whole export.
    Every response names it (system_fingerprint)."""


class ModelRegistry:
    def __init__(self, generator: Generator, base_name: str):
        export = generator.export
        entries = {base_name: ModelEntry(base_name, None, export.digest()[:VERSION_CHARS])}
        for name, adapter in export.manifest.get("adapters", {}).items():
            if name in entries:
                raise ServeError(f"adapter {name!r} has the name of the base model — serve the export under "
                                 "another name (rename its directory)")
            entries[name] = ModelEntry(name, name, export.manifest["files"][adapter["file"]][:VERSION_CHARS])
        self.base_name = base_name
        self._generator = generator
        self._entries = entries

    @property
    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def resolve(self, name: str | None) -> tuple[ModelEntry, Generator]:
        """The entry a request names (None: the base) and a generator view with its adapter active."""
        entry = self._entries.get(self.base_name if name is None else name)
        if entry is None:
            raise APIError(404, f"model {name!r} does not exist — use one of: {', '.join(self._entries)} "
                                "(GET /v1/models lists them)", "model_not_found", param="model")
        return entry, self._generator.with_adapter(entry.adapter)
