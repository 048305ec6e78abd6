"""The demo's runtime step, run as its own process so that it provably never imports torch.

    python -m edge_lora.demo.runtime_check EXPORT_DIR EVAL_JSONL MAX_NEW_TOKENS

prints one JSON object: exact-match accuracy, latency figures, and the heavy modules found in sys.modules.
"""

from __future__ import annotations

import json
import sys

from edge_lora import runtime
from edge_lora.evaluate import runtime_exact_match
from edge_lora.runtime.profile import ProfileSettings, profile

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "optimum")
LATENCY_SETTINGS = ProfileSettings(prompt_lens=(16,), new_tokens=32, warmup_runs=2, min_runs=5, min_seconds=1.0)


def main(export_dir: str, eval_path: str, max_new_tokens: int) -> dict:
    samples = [json.loads(line) for line in open(eval_path) if line.strip()]
    accuracy = runtime_exact_match(runtime.load(export_dir), samples, max_new_tokens)
    summary = profile(export_dir, LATENCY_SETTINGS)["configurations"][0]["summary"]
    return {
        "correct": accuracy.correct,
        "total": accuracy.total,
        "ttft_s": summary["ttft_p50_s"],
        "decode_tokens_per_s": summary["decode_tokens_s"],
        "heavy_modules_loaded": [m for m in HEAVY if m in sys.modules],
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
