"""The parity gate: the ONNX model must compute what the trained PyTorch model computes.

check() compares one ONNX generator with the reference model on a few prompts; gate() runs it on an export's
portable graph, each adapter and the base, and each kernel graph where this host runs the kernel, records the
reports in export.json, and refuses the export (ParityError) if any fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.errors import UsageError
from edge_lora.formats import AdapterManifest
from edge_lora.train.data import read_jsonl

if TYPE_CHECKING:
    from edge_lora.export.inputs import ExportInputs

# Gates by precision: (max |Δlogit| allowed or None, minimum greedy agreement).
GATES = {
    "fp32": (1e-3, 1.0),
    # fp16 rounds every activation to 11 bits of mantissa; logits drift by ~1e-2, so only greedy agreement gates.
    "fp16": (None, 0.95),
    "int8": (None, 0.90),
    "int4": (None, 0.90),
}
GREEDY_TOKENS = 64
FALLBACK_PROMPTS = ("The quick brown fox", "edge-lora exports", "1 2 3 4", "Hello, world!")
PARITY_PROMPTS = 4
TWIN_TOLERANCE = 1e-4  # a tenth of the fp32 gate: within it the twin is the trained model for the gate's purpose


class ParityError(UsageError):
    """The export does not compute what the trained model computes; nothing was written."""


@dataclass(frozen=True)
class ParityReport:
    precision: str
    prompts: int
    max_abs_logit_diff: float
    """Over every position of each prompt and of the ONNX model's greedy continuation of it."""
    mean_abs_logit_diff: float
    greedy_agreement: float
    """Fraction of the ONNX model's greedy tokens (up to 64, or to its end-of-sequence token) that the PyTorch
    reference also ranks first, fed the same tokens before them."""
    greedy_prefix_agreement: float
    """Fraction of those tokens before the first one the reference would not have chosen: where the two models'
    own greedy runs part."""
    passed: bool
    gate: dict

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def sequence_logits(model, ids: list[int]):
    """The PyTorch model's logits (seq, vocab) over one sequence, as float32 numpy."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def check(reference_model, generator, prompts: list[str], precision: str) -> ParityReport:
    """The ONNX model generates greedily from each prompt (one batch, as it runs on the device); then both models
    read prompt + continuation in one pass each. Their logits are compared at every position, and at each
    generated position the reference's first choice against the token the ONNX model chose.

    Teacher-forcing the reference on the ONNX model's tokens, rather than letting it generate its own, costs one
    forward pass instead of 64 generation steps, checks the text the export will actually produce, and finds the
    first divergence of the two greedy runs all the same: up to it, both runs are the same tokens.
    """
    from edge_lora.runtime import SamplingConfig

    max_diff, diffs, agree, prefix, total = 0.0, [], 0, 0, 0
    prompt_ids = [generator.encode_prompt(prompt) for prompt in prompts]
    runs = generator.generate_batch(prompt_ids, SamplingConfig(max_new_tokens=GREEDY_TOKENS))
    for ids, run in zip(prompt_ids, runs):
        tokens, sequence = np.array(run.token_ids), ids + run.token_ids
        ref_logits = sequence_logits(reference_model, sequence)
        diff = np.abs(generator.logits(sequence) - ref_logits)
        max_diff = max(max_diff, float(diff.max()))
        diffs.append(float(diff.mean()))
        chosen = ref_logits[len(ids) - 1 : -1].argmax(-1) == tokens  # position t's argmax against token t+1
        agree += int(chosen.sum())
        prefix += int(np.argmin(chosen)) if not chosen.all() else len(tokens)
        total += len(tokens)
    max_allowed, min_agreement = GATES[precision]
    greedy = agree / total
    passed = greedy >= min_agreement and (max_allowed is None or max_diff <= max_allowed)
    return ParityReport(
        precision=precision,
        prompts=len(prompts),
        max_abs_logit_diff=max_diff,
        mean_abs_logit_diff=float(np.mean(diffs)),
        greedy_agreement=greedy,
        greedy_prefix_agreement=prefix / total,
        passed=passed,
        gate={"max_abs_logit_diff": max_allowed, "min_greedy_agreement": min_agreement},
    )


TASK_SAMPLES = 32


def task_accuracy(reference_model, generator, tokenizer_dir: Path, samples: list[dict]) -> dict:
    """Held-out exact match of the ONNX model and of the PyTorch reference on the same eval samples, both through
    eval's greedy runner (tokenized with `tokenizer_dir`'s tokenizer.json)."""
    from edge_lora.eval import targets
    from edge_lora.eval.run import exact_match

    samples = samples[:TASK_SAMPLES]
    onnx_target = targets.RuntimeTarget(targets.TargetSpec(generator.export.path, "export"), generator=generator)
    reference = targets.TorchTarget(targets.TargetSpec(tokenizer_dir, "adapter"), model=reference_model)
    longest = max(len(reference.tokenizer.encode(s["completion"], add_special_tokens=False)) for s in samples)
    return {
        "samples": len(samples),
        "onnx": exact_match(onnx_target, samples, longest + 2).value,
        "reference": exact_match(reference, samples, longest + 2).value,
    }


def parity_prompts(manifest: AdapterManifest) -> list[str]:
    """The first prompts of the adapter's eval set when it names one, else fixed generic prompts."""
    if manifest.eval_data_path:
        records = read_jsonl(manifest.eval_data_path)[:PARITY_PROMPTS]
        prompts = [r.get("prompt") or r.get("text", "")[:64] for _, r in records]
        if all(prompts):
            return prompts
    return list(FALLBACK_PROMPTS)


def reference_prompt_ids(tokenizer_dir: Path, manifest: AdapterManifest) -> list[list[int]]:
    """The parity prompts of the adapter with `manifest`, tokenized by the tokenizer in `tokenizer_dir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tokenizer(p)["input_ids"] for p in parity_prompts(manifest)]


def eval_samples(manifest: AdapterManifest) -> list[dict]:
    """The adapter's eval file's prompt/completion records, if it names one that still exists."""
    if not manifest.eval_data_path:
        return []
    records = [r for _, r in read_jsonl(manifest.eval_data_path)]
    return [r for r in records if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)]


def gate(export_dir: Path, export_json: dict, inputs: ExportInputs, reference) -> None:
    """Check the export in `export_dir` (its export.json written) against the trained model `reference`: the
    portable graph, then each kernel graph of export_json["kernels"] where this host runs its kernel (the device
    checks it otherwise). Records the reports in `export_json`; ParityError when any fails."""
    twin, export_json["parity_reference"] = parity_reference(reference, inputs)
    export_json["parity"] = run_parity(export_dir, twin, inputs)
    kernel_graphs = export_json.get("kernels", {})
    for kernel, entry in kernel_graphs.items():
        problem = kernel_problem(kernel)
        entry["parity"] = {"skipped": problem} if problem else run_parity(export_dir, twin, inputs, kernels=(kernel,))
    reports = {
        **export_json["parity"],
        **{
            f"{k} {name}": p
            for k, e in kernel_graphs.items()
            for name, p in e.get("parity", {}).items()
            if name != "skipped"
        },
    }
    failed = {k: v for k, v in reports.items() if not v["passed"]}
    if failed:
        which, p = next(iter(failed.items()))
        raise ParityError(
            f"parity gate failed for {inputs.options.precision} ({which}): max |Δlogit| "
            f"{p['max_abs_logit_diff']:.2e}, greedy agreement {p['greedy_agreement']:.1%} (gate {p['gate']}) — "
            "nothing was written; try a higher precision, or --no-validate to export anyway"
        )


def parity_reference(reference, inputs: ExportInputs):
    """The model the parity gate generates with: the fp32 twin of the trained 4-bit model (reference.fp32_twin)
    when its logits match the 4-bit model's on the parity prompts, for every adapter, within TWIN_TOLERANCE;
    else the 4-bit model itself. A reference with no 4-bit layers (a foreign LoRA trained on a full-precision
    base) already computes in plain fp32 layers: it is its own twin. Returns it and a record for export.json."""
    import torch

    from edge_lora.train.reference import base_dtype, fp32_twin, held_in_4bit

    if not held_in_4bit(inputs.manifests[0]):
        dtype = base_dtype(inputs.manifests[0])
        return reference, {"model": f"the full-precision base ({dtype} weights, fp32 compute) with the adapters"}

    twin = fp32_twin(reference, inputs.model_dir, inputs.dirs, inputs.names)
    prompts = [torch.tensor([ids]) for ids in reference_prompt_ids(inputs.tokenizer_dir, inputs.manifests[0])]
    gap = 0.0
    with torch.no_grad():
        for name in inputs.names:
            reference.set_adapter(name)
            twin.set_adapter(name)
            gap = max(gap, *((twin(ids).logits - reference(ids).logits).abs().max().item() for ids in prompts))
    reference.set_adapter(inputs.names[0])
    twin.set_adapter(inputs.names[0])
    record = {"twin_max_abs_logit_diff": gap, "tolerance": TWIN_TOLERANCE}
    if gap <= TWIN_TOLERANCE:
        return twin, record | {"model": "fp32 twin of the 4-bit model (dequantized weights, same adapters)"}
    return reference, record | {"model": "4-bit model (its fp32 twin differed beyond the tolerance)"}


def run_parity(export_dir: Path, reference, inputs: ExportInputs, kernels: tuple[str, ...] = ()) -> dict:
    """Parity reports by what was checked: "merged"; or each adapter by name and "base" (no adapter active).
    Where an adapter's manifest names an eval set of prompt/completion records, its report also gives the
    task accuracy of the ONNX model beside the reference's. `kernels`: the graph for those kernels, not the
    portable one."""
    from edge_lora import runtime

    precision = inputs.options.precision
    generator = runtime.load(export_dir, device=inputs.options.device, kernels=kernels)
    if tuple(kernels) != ((generator.kernel,) if generator.kernel else ()):
        raise RuntimeError(f"{export_dir}: asked for kernels {kernels}, the runtime took {generator.kernel}")

    def report(gen, manifest: AdapterManifest) -> dict:
        result = check(reference, gen, parity_prompts(manifest), precision).to_dict()
        samples = eval_samples(manifest)
        if samples:
            result["task_accuracy"] = task_accuracy(reference, gen, inputs.tokenizer_dir, samples)
        return result

    if inputs.options.flavor == "merged":
        return {"merged": report(generator, inputs.manifests[0])}
    reports = {}
    for name, manifest in zip(inputs.names, inputs.manifests):
        reference.set_adapter(name)
        reports[name] = report(generator.with_adapter(name), manifest)
    with reference.disable_adapter():
        reports["base"] = check(reference, generator, parity_prompts(inputs.manifests[0]), precision).to_dict()
    return reports


def kernel_problem(kernel: str) -> str | None:
    """Why this host cannot run `kernel` (None when it can): its parity is then left to the device."""
    from edge_lora.runtime import kernels

    try:
        kernels.library(kernel)
    except kernels.KernelUnavailable as e:
        return f"not checked on the exporting host: {e}"
    return None
