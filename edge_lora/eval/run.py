"""`evaluate()`: one target on one or more eval files → a figure with its 95% interval per file, and every
sample's output, score and latency."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from edge_lora.eval import metrics, targets
from edge_lora.eval.metrics import MetricName, Summary
from edge_lora.eval.samples import EvalError, EvalSample, check_metric_fits, read_samples
from edge_lora.progress import progress_bar


@dataclass(frozen=True)
class EvalSettings:
    """How a target is evaluated."""

    metric: MetricName = "exact"
    """exact, contains, token-f1 or perplexity (see edge_lora.eval.metrics)."""
    max_new_tokens: int | None = None
    """Greedy tokens generated per sample; None: the longest reference in the file, in tokens, plus its
    end-of-sequence token and one more, which is enough for any output that can match."""
    base: str | None = None
    """Base model dir of an adapter target, if not where its manifest says."""
    device: str | None = None
    """Device profile of an export target (providers, threads)."""
    threads: int | None = None
    """Intra-op threads of an export target."""

    def __post_init__(self):
        problems = []
        if self.metric not in metrics.METRICS:
            problems.append(f"metric {self.metric!r} is not one of {', '.join(metrics.METRICS)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if problems:
            raise EvalError("bad eval settings: " + "; ".join(problems))


@dataclass(frozen=True)
class SampleResult:
    where: str
    """file:line of the record."""
    prompt: str | list
    reference: str
    output: str | None
    """The greedy completion (None for perplexity)."""
    score: float
    """1/0 for exact and contains, the F1 for token-f1, the sample's own perplexity for perplexity."""
    latency_s: float
    """Wall time of the sample's generation, or of its forward pass for perplexity."""
    nll: float | None = None
    """Summed negative log-likelihood of the reference tokens (perplexity only)."""
    tokens: int | None = None
    """Reference tokens scored (perplexity only)."""

    @property
    def loss(self) -> float:
        """Lower is better, for pairing two targets sample by sample: the mean NLL, or 1 - score."""
        return self.nll / self.tokens if self.nll is not None else 1.0 - self.score


@dataclass(frozen=True)
class FileResult:
    data: str
    summary: Summary
    samples: tuple[SampleResult, ...]

    @property
    def latency_p50_s(self) -> float:
        return statistics.median(s.latency_s for s in self.samples)


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def exact_match(target: targets.Target, records: list[dict], max_new_tokens: int) -> Accuracy:
    """Held-out exact match of a target's greedy completions of prompt/completion records: the task accuracy the
    export's parity gate and the demo report, through the same greedy runner as `evaluate`."""
    prompts = [target.tokenizer.encode(r["prompt"]) for r in records]
    outputs = target.complete_batch(prompts, max_new_tokens)
    return Accuracy(int(sum(metrics.exact(o, r["completion"]) for o, r in zip(outputs, records))), len(records))


@dataclass(frozen=True)
class EvalReport:
    target: str
    metric: MetricName
    files: tuple[FileResult, ...]


def check_target(target_spec: targets.TargetSpec, metric: str) -> None:
    """A metric the target cannot give is refused before the model is loaded."""
    if metric == "perplexity" and not target_spec.has_logits():
        raise EvalError(
            f"--metric perplexity needs logits, and the graph of {target_spec.path} has no 'logits' output "
            "(see its export.json outputs) — use a generation metric (exact, contains, token-f1)"
        )


def read_files(data: list[str | Path], metric: str) -> dict[str, list[EvalSample]]:
    """Every eval file's samples, checked to fit the metric."""
    if not data:
        raise EvalError("no eval data — pass one or more --data FILE.jsonl")
    files = {}
    for path in data:
        samples = read_samples(path)
        check_metric_fits(samples, metric)
        files[str(path)] = samples
    return files


def evaluate(
    target: str | Path,
    data: list[str | Path],
    settings: EvalSettings = EvalSettings(),
    adapter: str | None = None,
    show_progress: bool = True,
) -> EvalReport:
    """Evaluate an export dir (on the runtime) or an adapter dir (in PyTorch) on each eval file."""
    target_spec = targets.spec(target, adapter)
    check_target(target_spec, settings.metric)
    files = read_files(data, settings.metric)
    loaded = targets.load(target_spec, base=settings.base, device=settings.device, threads=settings.threads)
    return run(loaded, files, settings, show_progress)


def run(
    target: targets.Target,
    files: dict[str, list[EvalSample]],
    settings: EvalSettings,
    show_progress: bool = True,
    description: str = "eval",
) -> EvalReport:
    total = sum(len(samples) for samples in files.values())
    results = []
    with progress_bar(description, total=total, enabled=show_progress) as advance:
        for data, samples in files.items():
            budget = new_tokens(target, samples, settings)
            rows = [score_sample(target, s, settings, budget, advance) for s in samples]
            results.append(FileResult(data, summarise(settings.metric, rows), tuple(rows)))
    return EvalReport(target.spec.label, settings.metric, tuple(results))


def summarise(metric: MetricName, rows: list[SampleResult]) -> Summary:
    if metric == "perplexity":
        return metrics.summarise(metric, [], [r.nll for r in rows], [r.tokens for r in rows])
    return metrics.summarise(metric, [r.score for r in rows])


def new_tokens(target: targets.Target, samples: list[EvalSample], settings: EvalSettings) -> int:
    if settings.max_new_tokens is not None:
        return settings.max_new_tokens
    return max(len(target.reference_ids(s)) for s in samples) + 1


def score_sample(
    target: targets.Target, sample: EvalSample, settings: EvalSettings, max_new_tokens: int, advance
) -> SampleResult:
    prompt_ids = target.prompt_ids(sample)
    prompt = list(sample.messages) if sample.shape == "messages" else sample.prompt
    if settings.metric == "perplexity":
        ids = prompt_ids + target.reference_ids(sample)
        check_length(target, sample, len(ids), "prompt and reference")
        start = time.perf_counter()
        logits = target.logits(ids)
        seconds = time.perf_counter() - start
        first = max(len(prompt_ids), 1)  # a text record without a BOS: its first token is context, not scored
        value = metrics.nll(logits[first - 1 : len(ids) - 1], ids[first:])
        count = len(ids) - first
        advance(1)
        return SampleResult(
            sample.where, prompt, sample.reference, None, math.exp(value / count), seconds, value, count
        )
    check_length(target, sample, len(prompt_ids) + max_new_tokens, f"prompt and max_new_tokens {max_new_tokens}")
    output, seconds = target.complete(prompt_ids, max_new_tokens)
    advance(1)
    return SampleResult(
        sample.where,
        prompt,
        sample.reference,
        output,
        metrics.SCORERS[settings.metric](output, sample.reference),
        seconds,
    )


def check_length(target: targets.Target, sample: EvalSample, length: int, what: str) -> None:
    if length > target.context_length:
        raise EvalError(
            f"{sample.where}: {what} take {length} tokens, more than the model's context of "
            f"{target.context_length} — shorten the sample or lower --max-new-tokens"
        )
