"""An adapter of an `adapters` export, loaded once and fed to whichever kind of run the graph takes.

onnxruntime applies a LoraAdapter made active in RunOptions on `session.run` only: `run_with_iobinding` ignores it
(1.32 logs "run_with_iobinding has active adapters specified, but won't have an effect"). The builder graph runs
through IOBinding (fused.SharedCache), so there the adapter's tensors are bound as the graph's LoRA inputs
instead, as OrtValues read from the same file.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


class Adapter:
    """One .onnx_adapter file: `lora` for RunOptions (memory-mapped by onnxruntime), `tensors` for IOBinding."""

    def __init__(self, path: Path, tensors: dict[str, ort.OrtValue] | None = None):
        self.path = Path(path)
        self.lora = ort.LoraAdapter()
        self.lora.Load(str(self.path))
        self._tensors = tensors

    @property
    def tensors(self) -> dict[str, ort.OrtValue]:
        """{graph input name: OrtValue}, read on first use (two threads racing here read the same values)."""
        if self._tensors is None:
            self._tensors = ort.AdapterFormat.read_adapter(str(self.path)).get_parameters()
        return self._tensors
