"""Export: merge an adapter, write ONNX with KV cache at a chosen precision, and prove parity."""

from edge_lora.export.pipeline import ExportOptions, ParityError, export

__all__ = ["export", "ExportOptions", "ParityError"]
