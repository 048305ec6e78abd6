"""edge-lora: QLoRA fine-tune a Hugging Face causal LM, export it to ONNX with proven parity, run it torch-free.

One subpackage per stage, each with a plain function at its heart (docs/architecture.md):
edge_lora.train.train, edge_lora.export.export, edge_lora.runtime.load, edge_lora.eval.run.evaluate.
Importing this package imports nothing: each stage imports its dependencies when it is used.
"""
