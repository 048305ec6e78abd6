"""The bytes of an ONNX graph's weights, and how many of them one decode step reads, as export.json records them
("weight_bytes", "weight_bytes_per_token") for the profiler, which cannot import onnx.

A tensor's bytes are its element count times its element size, so that weights kept in external data
(model.onnx.data) and packed MatMulNBits blocks (uint8, with their scales) count as inline ones do; the graph is
read without its external data. Initializers and Constant nodes' values count, those of If/Loop/Scan bodies too.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from onnx import TensorProto

# Bits per element of each TensorProto data type. STRING holds no weights a kernel streams through: it counts the
# bytes the file stores, as does a type newer than this table.
_ELEMENT_BITS = {
    TensorProto.FLOAT: 32,
    TensorProto.UINT8: 8,
    TensorProto.INT8: 8,
    TensorProto.UINT16: 16,
    TensorProto.INT16: 16,
    TensorProto.INT32: 32,
    TensorProto.INT64: 64,
    TensorProto.BOOL: 8,
    TensorProto.FLOAT16: 16,
    TensorProto.DOUBLE: 64,
    TensorProto.UINT32: 32,
    TensorProto.UINT64: 64,
    TensorProto.COMPLEX64: 64,
    TensorProto.COMPLEX128: 128,
    TensorProto.BFLOAT16: 16,
    TensorProto.FLOAT8E4M3FN: 8,
    TensorProto.FLOAT8E4M3FNUZ: 8,
    TensorProto.FLOAT8E5M2: 8,
    TensorProto.FLOAT8E5M2FNUZ: 8,
    TensorProto.UINT4: 4,
    TensorProto.INT4: 4,
    TensorProto.FLOAT4E2M1: 4,
}
# Ops that read one slice of a table per index (input positions holding the table, attribute naming the axis):
# an embedding lookup reads one row per token, not the whole table. GatherBlockQuantized (com.microsoft) also
# gathers the rows of its scales and zero points.
_ROW_READERS = {"Gather": ((0,), "axis"), "GatherBlockQuantized": ((0, 2, 3), "gather_axis")}
# Ops whose output (input 0's data, another shape) is read the way the output's own readers read it: a shared
# embedding reaches its lookup through a Reshape of the head's int4 weight, one that keeps its rows (its first
# dimension), which is what a row of the original then counts.
_SHAPE_ONLY = {"Reshape"}


@dataclasses.dataclass(frozen=True)
class Weight:
    """One initializer, or the value of one Constant node (named by its output)."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    """Element count × element size (4-bit types packed two to a byte), wherever the data is stored."""


@dataclasses.dataclass(frozen=True)
class GraphWeights:
    """An ONNX model's initializers (and Constant node values) with the bytes one single-token step reads."""

    weights: tuple[Weight, ...]
    row_read: frozenset[str]
    """Weights read one row per token: every use is the table of an axis-0 Gather (embeddings, rotary caches)."""
    unused: frozenset[str]
    """Weights no node reads, such as those a graph rewrite left behind: not read per token."""

    @property
    def total_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    @property
    def bytes_per_token(self) -> int:
        """Weight bytes one decode step (one new token) reads: every weight once, but one row of a row-read table
        (its bytes over its first dimension) and nothing of an unused one."""
        total = 0
        for w in self.weights:
            if w.name in self.unused:
                continue
            if w.name in self.row_read and w.shape and w.shape[0] > 0:
                total += math.ceil(w.nbytes / w.shape[0])
            else:
                total += w.nbytes
        return total


def weight_bytes(model_path: str | Path) -> dict[str, int]:
    """export.json's figures of the graph at model_path: {"weight_bytes": …, "weight_bytes_per_token": …}."""
    weights = read_graph_weights(model_path)
    return {"weight_bytes": weights.total_bytes, "weight_bytes_per_token": weights.bytes_per_token}


def read_graph_weights(model_path: str | Path) -> GraphWeights:
    """The weights of the ONNX model at model_path; ValueError naming the file when it is not an ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except DecodeError:
        proto = None
    if proto is None or not proto.HasField("graph"):
        raise ValueError(f"{model_path} is truncated or not an ONNX model")
    weights: list[Weight] = []
    # name -> for each use, whether it reads one row per token, or (a shape-only op's input) the output it becomes
    uses: dict[str, list[bool | str]] = {}
    _walk_graph(proto.graph, weights, uses)
    names = {w.name for w in weights}

    def row_read(name: str, seen: frozenset = frozenset()) -> bool:  # every use a row read, through shape-only ops
        return (
            bool(uses.get(name))
            and name not in seen
            and all(row_read(use, seen | {name}) if isinstance(use, str) else use for use in uses[name])
        )

    return GraphWeights(
        weights=tuple(weights),
        row_read=frozenset(n for n in names if row_read(n)),
        unused=frozenset(n for n in names if not uses.get(n)),
    )


def _walk_graph(graph, weights: list[Weight], uses: dict[str, list[bool | str]]) -> None:
    weights += [_weight(tensor) for tensor in graph.initializer]
    for node in graph.node:
        _walk_node(node, weights, uses)


def _walk_node(node, weights: list[Weight], uses: dict[str, list[bool | str]]) -> None:
    row_inputs, axis_name = _ROW_READERS.get(node.op_type, ((), ""))
    axis = 0
    for attribute in node.attribute:
        if attribute.name == axis_name:
            axis = attribute.i
        if node.op_type == "Constant" and attribute.HasField("t"):  # a weight held by a node, named by its output
            weights.append(dataclasses.replace(_weight(attribute.t), name=node.output[0]))
        for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):  # If/Loop/Scan bodies
            _walk_graph(body, weights, uses)
    for position, name in enumerate(node.input):
        if name:
            through = node.op_type in _SHAPE_ONLY and position == 0 and node.output
            uses.setdefault(name, []).append(node.output[0] if through else position in row_inputs and axis == 0)


def _weight(tensor) -> Weight:
    dims = tuple(tensor.dims)
    bits = _ELEMENT_BITS.get(tensor.data_type)
    if bits is None:  # a string, or a type newer than the table: the bytes the file stores for it
        external = sum(int(entry.value) for entry in tensor.external_data if entry.key == "length")
        return Weight(tensor.name, dims, len(tensor.raw_data) + external)
    return Weight(tensor.name, dims, math.ceil(math.prod(dims) * bits / 8))
