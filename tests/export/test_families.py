"""Every model family the trainer supports, end to end: QLoRA training → adapter dir → merged fp32 ONNX → runtime.

Each family is a tiny random-weight model of the real architecture (edge_lora.tiny.FAMILIES), so that its own
layers are exercised: Phi-3's fused projections, tied embeddings (Qwen2, Gemma, GPT-2), Gemma's norm, embedding
scale and head_dim, GPT-2's Conv1D layers and learned positions. Each family's graph is checked as the default export
writes it (graph auto: the builder's for Llama, Mistral and Qwen2) and as torch's exporter writes it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_lora.formats import AdapterManifest
from edge_lora.tiny import FAMILIES

pytestmark = pytest.mark.slow  # every test here trains and exports one tiny model per family

# One completion for every prompt, with no character twice: 20 steps at a high learning rate teach it to every
# family, ending with </s>. A model that has learned its output ranks it far ahead of the rest, so greedy
# comparisons do not hang on near-ties of a random model, and the parity gate's greedy runs stop at </s>
# instead of running 64 tokens each (most of the time of an export at this size).
COMPLETION = " QLoRA-NF4."
TRAIN_STEPS = 20
LEARNING_RATE = 1e-2
MAX_NEW_TOKENS = 12
IDS = [1, 20, 21, 22, 23, 24]
# Tokens the trained model would not pick: decode through the cache must be right off its beaten path too.
CONTINUATION = [30, 40, 50, 60, 70, 80]
# Merging onto the original fp32 weights against PEFT's merge_and_unload: the same fp32 sums, another order.
MERGE_ATOL = 1e-6
# fp32 ONNX against the 4-bit + LoRA PyTorch model: the same fp32 arithmetic in another order of operations.
FP32_LOGIT_ATOL = 1e-4


@dataclass(frozen=True)
class Family:
    name: str
    base_dir: Path
    adapter_dir: Path
    export_dir: Path
    """The default export: graph auto."""
    torch_export_dir: Path
    """The export through torch's exporter: export_dir where auto picks it."""
    reference: object
    """The trained model as export.reference builds it: 4-bit base + adapter, eval mode."""
    prompts: list[str]

    def export_of(self, graph: str) -> Path:
        """The export with graph "auto" or "torch"."""
        return self.torch_export_dir if graph == "torch" else self.export_dir


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> tuple[Path, Path]:
    """train.jsonl (64 records) and eval.jsonl (4): random lowercase prompts of 4 to 20 letters, one completion."""
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("family-data")

    def write(path: Path, n: int) -> Path:
        prompts = ("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 20))) + " ->" for _ in range(n))
        path.write_text("".join(json.dumps({"prompt": p, "completion": COMPLETION}) + "\n" for p in prompts))
        return path

    return write(out / "train.jsonl", 64), write(out / "eval.jsonl", 4)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, task_files) -> Family:
    """Base, adapter and fp32 exports of one family (graph auto, and torch's), built once; the exports' parity gates
    have run inside."""
    from edge_lora.export import ExportOptions, export
    from edge_lora.tiny import build_base_model
    from edge_lora.train.config import TrainConfig
    from edge_lora.train.loop import train
    from edge_lora.train.reference import qlora_model

    name = request.param
    work = tmp_path_factory.mktemp(name)
    base_dir = build_base_model(work / "base", FAMILIES[name]())
    train_path, eval_path = task_files
    adapter_dir = train(
        TrainConfig(
            model=str(base_dir),
            data=str(train_path),
            eval_data=str(eval_path),
            output=str(work / "adapter"),
            max_steps=TRAIN_STEPS,
            batch_size=8,
            learning_rate=LEARNING_RATE,
        ),
        show_progress=False,
    )
    export_dir = export(adapter_dir, work / "export-fp32", ExportOptions(precision="fp32"), show_progress=False)
    torch_export_dir = export_dir
    if json.loads((export_dir / "export.json").read_text())["graph"] != "torch":
        torch_options = ExportOptions(precision="fp32", graph="torch")
        torch_export_dir = export(adapter_dir, work / "export-torch-fp32", torch_options, show_progress=False)
    prompts = [json.loads(line)["prompt"] for line in eval_path.read_text().splitlines()[:2]]
    reference = qlora_model(adapter_dir, base_dir, AdapterManifest.load(adapter_dir))
    return Family(name, base_dir, adapter_dir, export_dir, torch_export_dir, reference, prompts)


def test_adapter_loads_in_peft_and_changed_the_model(family):
    from peft import PeftModel

    from edge_lora.train.config import QuantConfig
    from edge_lora.train.qlora import load_quantized_base

    # PEFT's load computing in fp32, as the reference does (auto would pick bf16 on a CPU with it): equal to the bit.
    fp32 = QuantConfig(compute_dtype="float32")
    peft_model = PeftModel.from_pretrained(load_quantized_base(family.base_dir, fp32), family.adapter_dir).eval()
    ids = torch.tensor([IDS])
    with torch.no_grad():
        trained = family.reference(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, trained, rtol=0, atol=0)
        with family.reference.disable_adapter():
            base = family.reference(ids).logits
    # PEFT starts every B at zero: a change proves training moved the adapters.
    assert (trained - base).abs().max() > 1e-2


def test_merge_onto_original_weights_matches_peft_merge_and_unload(family):
    """The merge's layout handling (GPT-2's (in, out) Conv1D against its (out, in) 4-bit copy) against PEFT
    merging the same adapter into the full-precision model."""
    from peft import PeftModel

    from edge_lora.export.merge import merged_weights
    from edge_lora.train.reference import full_precision_base

    original = full_precision_base(family.base_dir).state_dict()
    ours = merged_weights(family.reference, original)
    peft_merged = PeftModel.from_pretrained(full_precision_base(family.base_dir), family.adapter_dir)
    expected = peft_merged.merge_and_unload().state_dict()
    assert ours and ours.keys() <= expected.keys()
    for name, weight in ours.items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=MERGE_ATOL)


@pytest.mark.parametrize("graph", ["auto", "torch"])
def test_export_passed_its_gate_and_describes_its_cache(family, graph):
    manifest = json.loads((family.export_of(graph) / "export.json").read_text())
    parity = manifest["parity"]["merged"]
    assert parity["passed"] and parity["greedy_agreement"] == 1.0 and parity["max_abs_logit_diff"] <= 1e-3
    kv = manifest["kv_cache"]
    inputs = {i["name"]: i["shape"] for i in manifest["inputs"]}
    assert len([n for n in inputs if n.startswith("past_key_values.")]) == 2 * kv["num_layers"] == 4
    # (batch, kv_heads, past_seq, head_dim): the layout export.json promises is the graph's.
    assert inputs["past_key_values.0.key"][1] == kv["num_kv_heads"]
    assert inputs["past_key_values.0.key"][3] == kv["head_dim"]
    assert kv["context_length"] == 256 and manifest["eos_token_ids"] == [2]
    if graph == "torch":  # batch, sequence and past dynamic, the mask as long as past and new tokens together
        outputs = {o["name"]: o["shape"] for o in manifest["outputs"]}
        assert manifest["graph"] == "torch"
        assert inputs["input_ids"] == inputs["position_ids"] == ["batch_size", "sequence_length"]
        assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
        past = ["batch_size", kv["num_kv_heads"], "past_sequence_length", kv["head_dim"]]
        assert inputs["past_key_values.1.value"] == past
        assert outputs["logits"] == ["batch_size", "sequence_length", 128]
        assert outputs["present.1.value"][2] == "past_sequence_length + sequence_length"


@pytest.mark.parametrize("graph", ["auto", "torch"])
def test_runtime_greedy_equals_transformers_generate(family, graph):
    from transformers import AutoTokenizer

    from edge_lora import runtime

    tokenizer = AutoTokenizer.from_pretrained(family.export_of(graph))
    generator = runtime.load(family.export_of(graph))
    for prompt in family.prompts:
        ids = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            expected = family.reference.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0)[
                0, ids["input_ids"].shape[1] :
            ]
        ours = generator.generate(prompt, runtime.SamplingConfig(max_new_tokens=MAX_NEW_TOKENS))
        assert ours.token_ids == expected.tolist()


@pytest.mark.parametrize("graph", ["auto", "torch"])
def test_runtime_decode_steps_match_pytorch_logits(family, graph):
    """Prefill, then one token at a time through the KV cache, against one PyTorch pass over the whole sequence:
    the cache layout export.json declares, and the positions of later tokens (GPT-2 learns its own)."""
    from edge_lora import runtime

    generator = runtime.load(family.export_of(graph))
    prompt = generator.encode_prompt(family.prompts[0])
    ids = prompt + CONTINUATION
    with torch.no_grad():
        expected = family.reference(torch.tensor([ids])).logits[0].numpy()
    kv = json.loads((family.export_of(graph) / "export.json").read_text())["kv_cache"]
    empty = np.zeros((1, kv["num_kv_heads"], 0, kv["head_dim"]), dtype=np.float32)  # (batch, kv_heads, seq, head_dim)
    past = {f"past_key_values.{i}.{kind}": empty for i in range(kv["num_layers"]) for kind in ("key", "value")}
    logits, past = generator.forward(np.array([prompt]), past, 0)
    steps = [logits[0, -1]]
    for position, token in enumerate(ids[len(prompt) : -1], start=len(prompt)):
        logits, past = generator.forward(np.array([[token]]), past, position)
        steps.append(logits[0, -1])
    np.testing.assert_allclose(np.stack(steps), expected[len(prompt) - 1 : -1], rtol=0, atol=FP32_LOGIT_ATOL)
