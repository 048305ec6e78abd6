"""Evaluation: a target (an export dir on the runtime, or an adapter dir in PyTorch) on eval JSONL files, a
metric with its 95% confidence interval, and a paired regression gate between two targets.

    edge_lora.eval.run.evaluate(target, [data], EvalSettings(metric=...)) -> EvalReport
    edge_lora.eval.compare.compare(old, new, [data], settings, margin) -> Comparison
    edge_lora.eval.report: the tables and the per-sample JSONL

Evaluating an export never imports torch.
"""
