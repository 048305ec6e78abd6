"""The ONNX graphs an export writes: optimum's exporter (every architecture and precision) and onnxruntime-genai's
model builder (Llama, Mistral, Qwen2 at fp32/int4), each with the LoRA inputs of an `adapters` export."""
