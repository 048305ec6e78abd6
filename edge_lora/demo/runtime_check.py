"""The demo's runtime step, run as its own process so that it provably never imports torch.

    python -m edge_lora.demo.runtime_check EXPORT_DIR EVAL_JSONL MAX_NEW_TOKENS

prints one JSON object: exact-match accuracy with every sample's result, latency figures, and the heavy modules
found in sys.modules.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from edge_lora.eval.run import EvalSettings, evaluate
from edge_lora.runtime.profile.sweep import ProfileSettings, profile

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "onnxscript")
LATENCY_SETTINGS = ProfileSettings(prompt_lens=(16,), new_tokens=32, warmup_runs=2, min_runs=5, min_seconds=1.0)


def main(export_dir: str, eval_path: str, max_new_tokens: int) -> dict:
    accuracy = evaluate(
        export_dir, [eval_path], EvalSettings(metric="exact", max_new_tokens=max_new_tokens), show_progress=False
    ).files[0]
    summary = profile(export_dir, LATENCY_SETTINGS).configurations[0]["summary"]
    return {
        "correct": int(sum(s.score for s in accuracy.samples)),
        "total": len(accuracy.samples),
        "samples": [dataclasses.asdict(s) for s in accuracy.samples],  # for the paired int4-against-fp32 gate
        "ttft_s": summary["ttft_p50_s"],
        "decode_tokens_per_s": summary["decode_tokens_s"],
        "heavy_modules_loaded": [m for m in HEAVY if m in sys.modules],
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
