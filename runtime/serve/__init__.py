"""The OpenAI-compatible server (FastAPI + uvicorn, extra `serve`): edge_lora.runtime.serve.app.serve."""
