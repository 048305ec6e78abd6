"""An adapter of an `adapters` export, loaded once and fed to whichever kind of run the graph takes.

onnxruntime applies a LoraAdapter made active in RunOptions on `session.run` only: `run_with_iobinding` ignores it
(1.32 logs "run_with_iobinding has active adapters specified, but won't have an effect"). The builder graph runs
through IOBinding (cache.SharedCache), so there the adapter's tensors are bound as the graph's LoRA inputs
instead, as OrtValues over the same file's pages (`map_tensors`): each adapter costs page cache that the kernel
can share and drop, not a private copy per adapter and per process.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort

# onnxruntime's TensorDataType (the ONNX TensorProto codes) → numpy, for the types an adapter's A and B come in
NUMPY_TYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}


class Adapter:
    """One .onnx_adapter file: `lora` for RunOptions (memory-mapped by onnxruntime), `tensors` for IOBinding
    (memory-mapped here: map_tensors)."""

    def __init__(self, path: Path, tensors: dict[str, ort.OrtValue] | None = None, form: str | None = None):
        self.path = Path(path)
        self.lora = ort.LoraAdapter()
        self.lora.Load(str(self.path))
        self._tensors = tensors
        self.form = form
        """None: A and B by the portable graph's LoRA inputs; a kernel's name: the inputs of that kernel's graph."""
        self._converted: dict[str, dict] = {}

    @property
    def tensors(self) -> dict[str, ort.OrtValue]:
        """{graph input name: OrtValue}, mapped on first use (two threads racing here map the same file)."""
        if self._tensors is None:
            self._tensors = map_tensors(self.path)
        return self._tensors

    def tensors_for(self, kernel: str | None, slots: list | None) -> dict[str, ort.OrtValue]:
        """The tensors in the form the graph of `kernel` (None: the portable graph) takes: converted once from the
        portable form (`slots`: export.json's kernels.KERNEL.lora_slots) and kept, when the file holds that."""
        if kernel == self.form:
            return self.tensors
        if self.form is not None:
            graph = "the portable graph" if kernel is None else f"the {kernel} graph"
            raise ValueError(f"{self.path} holds the {self.form} graph's LoRA inputs; this session runs {graph}")
        if not slots:
            raise ValueError(f"this export's {kernel} graph has no LoRA inputs: it is not an `adapters` export")
        if kernel not in self._converted:
            from edge_lora.runtime.kernels import lora_blobs

            blobs = lora_blobs({name: value.numpy() for name, value in self.tensors.items()}, slots)
            self._converted[kernel] = MappedTensors(
                {name: ort.OrtValue.ortvalue_from_numpy(blob) for name, blob in blobs.items()}, list(blobs.values())
            )
        return self._converted[kernel]


class MappedTensors(dict):
    """{name: OrtValue} wrapping arrays over a memory-mapped file. OrtValue.ortvalue_from_numpy wraps an array
    without holding it, so the dict holds the arrays (and through them the map) for as long as it lives."""

    def __init__(self, values: dict[str, ort.OrtValue], arrays: list[np.ndarray]):
        super().__init__(values)
        self.arrays = arrays


def map_tensors(path: Path) -> dict[str, ort.OrtValue]:
    """The parameters of an .onnx_adapter file as OrtValues over the file's pages, copying nothing.

    The file is a flatbuffer (onnxruntime's adapter_schema.fbs, "TORT"): an Adapter table whose fourth field is a
    vector of Parameter tables (name, dims, data_type, raw_data). A file this reader does not expect (another
    type, a size that does not match, an unaligned tensor) is read by onnxruntime instead, which copies it, or
    raises its RuntimeError for a file that is no adapter at all.
    """
    from flatbuffers import number_types
    from flatbuffers.encode import Get
    from flatbuffers.table import Table

    def field(table: Table, i: int) -> int:
        """Where the table's i-th field is (0 when the file leaves it out: a vector then reads as empty)."""
        return table.Offset(4 + 2 * i)

    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")  # ValueError for an empty file
        buffer = memoryview(mapped)
        if bytes(buffer[4:8]) != b"TORT":
            raise ValueError("no TORT identifier")
        adapter = Table(buffer, Get(number_types.UOffsetTFlags.packer_type, buffer, 0))
        params = field(adapter, 3)
        values, arrays = {}, []
        for i in range(adapter.VectorLen(params) if params else 0):
            param = Table(buffer, adapter.Indirect(adapter.Vector(params) + 4 * i))
            name_at, dims_at, type_at, raw_at = (field(param, k) for k in range(4))
            if not (name_at and type_at):
                raise ValueError(f"parameter {i} has no name or no data type")
            name = param.String(param.Pos + name_at).decode()
            dims = [
                param.Get(number_types.Int64Flags, param.Vector(dims_at) + 8 * k)
                for k in range(param.VectorLen(dims_at) if dims_at else 0)
            ]
            dtype = np.dtype(NUMPY_TYPES[param.Get(number_types.Int32Flags, param.Pos + type_at)])
            start, length = (param.Vector(raw_at), param.VectorLen(raw_at)) if raw_at else (0, 0)
            count = int(np.prod(dims, dtype=np.int64))
            if length != count * dtype.itemsize or start % dtype.itemsize:
                raise ValueError(f"{name}: {length} bytes at {start} for {dims} {dtype.name}")
            array = np.frombuffer(mapped, dtype=dtype, count=count, offset=start).reshape(dims)
            arrays.append(array)
            values[name] = ort.OrtValue.ortvalue_from_numpy(array)
    except (ValueError, KeyError, IndexError, TypeError, struct.error):
        return ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    return MappedTensors(values, arrays)
