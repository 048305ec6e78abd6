"""`edge-lora demo`: the whole job on a tiny model, offline (run.py), and the task it learns (task.py)."""
