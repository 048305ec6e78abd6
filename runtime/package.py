"""An export directory as the runtime sees it: `export.json`, its files and their sha256."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edge_lora.formats import TOKENIZER_FILE, ExportError, ExportManifest, sha256_file


@dataclass(frozen=True)
class ExportDir:
    path: Path
    manifest: ExportManifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    def graph_file(self, kernel: str | None = None) -> str:
        """The model file a session runs: the portable graph's (None), or that of `kernel`'s graph."""
        return self.manifest.graph_entry(kernel).model_file

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    def graph_files(self, kernel: str | None = None) -> set[str]:
        """The files the graph of `kernel` (None: the portable graph) reads and no other graph's session needs: its
        model file, its external data (that which the model file's name starts, and the data files it shares) and
        its adapters' files."""
        entry = self.manifest.graph_entry(kernel)
        model = entry.model_file
        own = {name for name in self.manifest.files if name == model or name.startswith(model + ".")}
        own |= set(entry.data_files)
        return own | {adapter.file for adapter in entry.adapters.values()}

    def verify(self, kernel: str | None = None) -> None:
        """Check that every listed file a session of `kernel`'s graph (None: the portable graph) reads is there
        with its recorded sha256: the other graphs' own files (an x86 export carries two copies of the weights,
        laid out for each) are left unread."""
        others = set().union(*(self.graph_files(k) for k in (None, *self.manifest.kernels) if k != kernel))
        skip = others - self.graph_files(kernel)
        for name in self.manifest.files:
            if name not in skip:
                self.verify_file(name)

    def verify_file(self, name: str) -> None:
        """ExportError unless the listed file `name` is there with its recorded sha256."""
        file, expected = self.path / name, self.manifest.files[name]
        if not file.exists():
            raise ExportError(f"{self.path}: {name} is missing — re-run edge-lora export or restore the file")
        actual = sha256_file(file)
        if actual != expected:
            raise ExportError(
                f"{self.path}: {name} sha256 {actual[:12]}… differs from export.json's {expected[:12]}… — "
                "the file was altered or corrupted; re-run edge-lora export"
            )

    def digest(self) -> str:
        """One digest of the whole export: the sha256 of its sorted file list with their sha256."""
        files = sorted(self.manifest.files.items())
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def open_export(path: str | Path, verify: bool = True) -> ExportDir:
    """Read `export.json` (ExportManifest.load names a missing dir, file or key on one line); with `verify`, check
    that every listed file is there with its recorded sha256 (runtime.load checks only those the graph it opens
    reads: ExportDir.verify)."""
    export = ExportDir(Path(path), ExportManifest.load(path))
    if verify:
        for name in export.manifest.files:
            export.verify_file(name)
    return export
