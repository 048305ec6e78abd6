"""Export: merge an adapter, write ONNX with KV cache at a chosen precision, and prove parity."""

from edge_lora.export.options import ExportOptions
from edge_lora.export.parity import ParityError
from edge_lora.export.pipeline import export

__all__ = ["export", "ExportOptions", "ParityError"]
