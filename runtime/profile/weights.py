"""The bytes of an ONNX graph's weights, and how many of them one decode step reads, from the model file alone.

The runtime cannot import onnx (it comes with the `export` extra) and onnxruntime does not list a session's
initializers, so this reads the few fields it needs straight from the protobuf wire format of onnx.proto
(https://protobuf.dev/programming-guides/encoding/): ModelProto.graph; GraphProto.node and .initializer;
NodeProto inputs, op_type and attributes (subgraphs of If/Loop/Scan included); TensorProto dims and data_type.
A tensor's bytes are its element count times its element size, so that weights kept in external data
(model.onnx.data) and packed MatMulNBits blocks (uint8, with their scales) count as inline ones do.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from pathlib import Path

# TensorProto.DataType -> bits per element (onnx.proto). STRING (8) holds no weights a kernel streams through.
_ELEMENT_BITS = {
    1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128,
    16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4,
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


def read_graph_weights(model_path: str | Path) -> GraphWeights:
    """The weights of the ONNX model at model_path; ValueError naming the file when it is not an ONNX model."""
    problem = f"{model_path} is truncated or not an ONNX model"
    if Path(model_path).stat().st_size == 0:
        raise ValueError(problem)
    weights: list[Weight] = []
    # name -> for each use, whether it reads one row per token, or (a shape-only op's input) the output it becomes
    uses: dict[str, list[bool | str]] = {}
    # Mapped, not read: a graph with inline weights can be gigabytes, of which only the small fields are parsed.
    with open(model_path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        try:
            graphs = [value for field, value in _fields(view) if field == 7]  # ModelProto.graph
            valid = len(graphs) == 1
            if valid:
                _walk_graph(graphs[0], weights, uses)
        except (IndexError, ValueError, UnicodeDecodeError):  # a field ran past the end, or bytes that are not protobuf
            valid = False  # raised below, once the traceback's views of the mapping are gone and it can close
        graphs = None
        view.release()
    if not valid:
        raise ValueError(problem)
    names = {w.name for w in weights}

    def row_read(name: str, seen: frozenset = frozenset()) -> bool:  # every use a row read, through shape-only ops
        return bool(uses.get(name)) and name not in seen and all(
            row_read(use, seen | {name}) if isinstance(use, str) else use for use in uses[name])

    return GraphWeights(
        weights=tuple(weights),
        row_read=frozenset(n for n in names if row_read(n)),
        unused=frozenset(n for n in names if not uses.get(n)),
    )


def _walk_graph(graph: memoryview, weights: list[Weight], uses: dict[str, list[bool | str]]) -> None:
    for field, value in _fields(graph):
        if field == 5:  # GraphProto.initializer
            weights.append(_tensor(value))
        elif field == 1:  # GraphProto.node
            _walk_node(value, weights, uses)


def _walk_node(node: memoryview, weights: list[Weight], uses: dict[str, list[bool | str]]) -> None:
    inputs, outputs, op_type, attributes = [], [], "", []
    for field, value in _fields(node):
        if field == 1:
            inputs.append(bytes(value).decode())
        elif field == 2:
            outputs.append(bytes(value).decode())
        elif field == 4:
            op_type = bytes(value).decode()
        elif field == 5:
            attributes.append(value)
    row_inputs, axis_name = _ROW_READERS.get(op_type, ((), ""))
    axis = 0
    for attribute in attributes:
        name, number = "", 0
        for field, value in _fields(attribute):
            if field == 1:
                name = bytes(value).decode()
            elif field == 3:  # AttributeProto.i
                number = value
            elif field == 5 and op_type == "Constant":  # AttributeProto.t: a weight held by a node, named by its output
                weights.append(dataclasses.replace(_tensor(value), name=outputs[0]))
            elif field in (6, 11):  # AttributeProto.g, one of .graphs: If/Loop/Scan bodies
                _walk_graph(value, weights, uses)
        if name == axis_name:
            axis = number
    for position, name in enumerate(inputs):
        if name:
            through = op_type in _SHAPE_ONLY and position == 0 and outputs
            uses.setdefault(name, []).append(outputs[0] if through else position in row_inputs and axis == 0)


def _tensor(tensor: memoryview) -> Weight:
    dims, data_type, name, stored = [], 0, "", 0
    for field, value in _fields(tensor):
        if field == 1:  # dims: one varint each, or a packed run of them
            dims += _packed_varints(value) if isinstance(value, memoryview) else [value]
        elif field == 2:
            data_type = value
        elif field == 8:
            name = bytes(value).decode()
        elif field == 9:  # raw_data
            stored += len(value)
        elif field == 13:  # external_data: {key, value} entries, among them "length"
            entry = dict(_fields(value))
            if bytes(entry.get(1, b"")) == b"length":
                stored += int(bytes(entry[2]))
    bits = _ELEMENT_BITS.get(data_type)
    if bits is None:  # a string, or a type newer than this table: the bytes the file stores for it
        return Weight(name, tuple(dims), stored)
    return Weight(name, tuple(dims), math.ceil(math.prod(dims) * bits / 8))


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _packed_varints(data: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(data):
        value, pos = _varint(data, pos)
        values.append(value)
    return values


def _fields(message: memoryview):
    """(field number, value) of a protobuf message: an int for varint and fixed-width fields, a memoryview of the
    payload for length-delimited ones (sub-messages, strings, bytes, packed runs)."""
    pos, end = 0, len(message)
    while pos < end:
        key, pos = _varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(message, pos)
        elif wire == 1:
            value, pos = int.from_bytes(message[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(message, pos)
            value, pos = message[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(message[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")
        if pos > end:
            raise ValueError("a protobuf field runs past the end of its message")
        yield field, value
