"""What the import tests share: which modules a fresh interpreter holds after running some code."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "onnxscript", "accelerate")


def heavy_modules_after(code: str) -> list[str]:
    """The HEAVY modules loaded after `code` runs in a new interpreter."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]
