"""An export directory as the runtime sees it: `export.json`, its files and their sha256."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edge_lora.formats import EXPORT_MANIFEST, TOKENIZER_FILE


class ExportError(ValueError):
    """The export directory is missing, incomplete or altered; the message says which and how to fix it."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ExportDir:
    path: Path
    manifest: dict

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model_file"]

    def graph_file(self, kernel: str | None = None) -> str:
        """The model file a session runs: the portable graph's (None), or that of `kernel`'s graph."""
        return self.manifest["kernels"][kernel]["model_file"] if kernel else self.manifest["model_file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    def graph_files(self, kernel: str | None = None) -> set[str]:
        """The files the graph of `kernel` (None: the portable graph) reads and no other graph's session needs: its
        model file, its external data (that which the model file's name starts, and the data files it shares) and
        its adapters' files."""
        entry = self.manifest["kernels"][kernel] if kernel else self.manifest
        model = entry["model_file"]
        own = {name for name in self.manifest["files"] if name == model or name.startswith(model + ".")}
        own |= set(entry.get("data_files", ()))
        return own | {adapter["file"] for adapter in entry.get("adapters", {}).values()}

    def verify(self, kernel: str | None = None) -> None:
        """Check that every listed file a session of `kernel`'s graph (None: the portable graph) reads is there
        with its recorded sha256: the other graphs' own files (an x86 export carries two copies of the weights,
        laid out for each) are left unread."""
        others = set().union(*(self.graph_files(k) for k in (None, *self.manifest.get("kernels", {})) if k != kernel))
        skip = others - self.graph_files(kernel)
        for name in self.manifest["files"]:
            if name not in skip:
                self.verify_file(name)

    def verify_file(self, name: str) -> None:
        """ExportError unless the listed file `name` is there with its recorded sha256."""
        file, expected = self.path / name, self.manifest["files"][name]
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
        files = sorted(self.manifest["files"].items())
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def open_export(path: str | Path, verify: bool = True) -> ExportDir:
    """Read `export.json`; with `verify`, check that every listed file is there with its recorded sha256
    (runtime.load checks only those the graph it opens reads: ExportDir.verify)."""
    path = Path(path)
    manifest_path = path / EXPORT_MANIFEST
    if not path.is_dir():
        raise ExportError(f"export dir {path} does not exist — pass the --output dir of edge-lora export")
    if not manifest_path.exists():
        raise ExportError(f"{path} is not an export: no {EXPORT_MANIFEST} — pass a dir written by edge-lora export")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{manifest_path} is not valid JSON ({e}) — re-run edge-lora export") from None
    for key in ("model_file", "files", "kv_cache"):
        if key not in manifest:
            raise ExportError(f"{manifest_path} lacks {key!r} — it was not written by this edge-lora; "
                              "re-run edge-lora export")
    export = ExportDir(path, manifest)
    if verify:
        for name in manifest["files"]:
            export.verify_file(name)
    return export
