"""The ONNX graphs an export writes: torch's ONNX exporter (portable.py: every architecture and precision) and
onnxruntime-genai's model builder (builder.py: Llama, Mistral, Qwen2 at fp32/int4); the LoRA inputs of an `adapters`
export on either (lora_inputs.py); and the weight bytes export.json records for each graph (weight_bytes.py)."""
