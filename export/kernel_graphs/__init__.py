"""Graphs for edge-lora's own onnxruntime ops (edge_lora.runtime.kernels), written beside a builder export's
model.onnx over the same weights: model.q4.onnx (MatMulQ4) and model.lora.onnx (LoraAdd)."""
