"""The LoRA input's byte layout, as both ops read it (src/op_common.h: parse_lora, find_slot): an adapter's A and B
in int8, a blob for each node, and the one table of the nodes' blobs that the kernel graph takes."""

from __future__ import annotations

import numpy as np

from edge_lora.runtime.kernels import LORA_INPUT, TILE


def quantize_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A (K, r) and B (r, n) as MatMulQ4 takes them: int8 A with a scale per column, int8 B with a scale per row
    laid out (n/16, r, 16), the two scales' product per rank, and A's scales."""

    def int8(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        scale = np.abs(values).max(axis=axis, keepdims=True).astype(np.float32) / 127
        q = np.round(values / np.where(scale == 0, 1, scale)).astype(np.int8)
        return q, scale.reshape(-1)

    (qa, sa), (qb, sb) = int8(a.astype(np.float32), 0), int8(b.astype(np.float32), 1)
    r, n = b.shape
    qb = qb.reshape(r, n // TILE, TILE).transpose(1, 0, 2)
    return np.ascontiguousarray(qa), np.ascontiguousarray(qb), (sa * sb).astype(np.float32), sa


def lora_blob(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One node's LoRA input from its pairs [(A (K, r), B (r, n)), …] in output order: a 64-byte header of int32
    (pair count, then r and n of each pair), then per pair its scales, A and B, each padded to 64 bytes. No
    pairs: the header alone, which the op reads as no adapter."""
    header = np.zeros(16, dtype=np.int32)
    header[0] = len(pairs)
    parts = []
    for i, (a, b) in enumerate(pairs):
        header[1 + 2 * i], header[2 + 2 * i] = b.shape
        if b.shape[0] == 0:  # rank 0: the adapter leaves this projection alone
            continue
        qa, qb, scale, _ = quantize_pair(a, b)
        for part in (scale.tobytes(), qa.tobytes(), qb.tobytes()):
            parts.append(part + bytes(-len(part) % 64))
    return np.frombuffer(header.tobytes() + b"".join(parts), dtype=np.uint8).copy()


def lora_table(blobs: list[np.ndarray]) -> np.ndarray:
    """The kernel graph's LoRA input from its nodes' blobs in slot order: int64 count and count + 1 byte offsets,
    padded to 64 bytes, then each blob on a 64-byte boundary (op_common.h, find_slot)."""
    head = 8 * (len(blobs) + 2)
    head += -head % 64
    offsets, at = [], head
    for blob in blobs:
        offsets.append(at)
        at += len(blob) + (-len(blob) % 64)
    out = np.zeros(at, dtype=np.uint8)
    out[: 8 * (len(blobs) + 2)] = np.frombuffer(
        np.array([len(blobs), *offsets, at], dtype=np.int64).tobytes(), np.uint8
    )
    for offset, blob in zip(offsets, blobs):
        out[offset : offset + len(blob)] = blob
    return out


def lora_blobs(tensors: dict[str, np.ndarray], slots: list[list]) -> dict[str, np.ndarray]:
    """An adapter's fp32 A and B ({graph input of the portable graph: array}) as the kernel graph's LoRA input
    ({"lora": table}), `slots` being export.json's kernels.KERNEL.lora_slots ([[[A name, B name, K, n], …] for
    each node, in slot order]). A projection the adapter leaves out (its file holds neither A nor B) is a pair
    of rank 0."""
    blobs = []
    for node_pairs in slots:
        arrays = []
        for a_name, b_name, k, n in node_pairs:
            if (a_name in tensors) != (b_name in tensors):
                raise ValueError(f"the adapter holds {a_name if a_name in tensors else b_name} without its partner")
            arrays.append(
                (tensors[a_name], tensors[b_name])
                if a_name in tensors
                else (np.zeros((k, 0), np.float32), np.zeros((0, n), np.float32))
            )
        blobs.append(lora_blob(arrays))
    return {LORA_INPUT: lora_table(blobs)}
