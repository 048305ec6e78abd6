"""Adapters trained by other tools: plain PEFT adapter dirs (no edge_lora.json) exported with --trained-on, and
what such dirs may hold that edge-lora refuses, each with one line.

The adapters are made with PEFT alone (get_peft_model, random non-zero lora_B, save_pretrained): no edge-lora
training code.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, edge_lora

from edge_lora.errors import UsageError
from edge_lora.export import ExportOptions, export


def peft_adapter(base_dir: Path, out: Path, seed: int = 0, **config) -> Path:
    """A LoRA adapter saved by PEFT on the full-precision base, its B filled (PEFT's default leaves it zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False) | config
    get_peft_model(model, LoraConfig(**settings)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{family: base dir}, built on first use."""
    from edge_lora.tiny import FAMILIES, build_base_model

    root, built = tmp_path_factory.mktemp("foreign-bases"), {}

    def base(family: str) -> Path:
        if family not in built:
            built[family] = build_base_model(root / family, FAMILIES[family]())
        return built[family]

    return base


@pytest.fixture(scope="module")
def llama_adapter(bases, tmp_path_factory) -> Path:
    return peft_adapter(bases("llama"), tmp_path_factory.mktemp("foreign") / "peft-llama")


def exported(adapter_dir: Path, out: Path, **options) -> dict:
    export(adapter_dir, out, ExportOptions(**options), show_progress=False)
    return json.loads((out / "export.json").read_text())


def assert_passed(export_json: dict) -> None:
    assert export_json["parity"] and all(p["passed"] for p in export_json["parity"].values()), export_json["parity"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, trained_on, flavor",
    [
        ("llama", "fp32", "merged"),
        ("llama", "fp32", "adapters"),
        ("llama", "nf4", "merged"),
        ("llama", "nf4", "adapters"),
        ("llama", "bf16", "merged"),
        ("gpt2", "fp32", "merged"),
        ("gpt2", "nf4", "adapters"),
        ("gpt2", "fp16", "merged"),
        ("qwen2", "nf4", "merged"),
        ("qwen2", "fp32", "adapters"),
        ("mistral", "nf4", "adapters"),
        ("phi3", "nf4", "merged"),
        ("gemma", "fp32", "merged"),
    ],
)
def test_a_peft_adapter_exports_and_passes_parity(bases, tmp_path, family, trained_on, flavor):
    from edge_lora import lineage

    adapter = peft_adapter(bases(family), tmp_path / "peft")
    assert not (adapter / "edge_lora.json").exists() and not (adapter / "tokenizer.json").exists()
    out = tmp_path / "x"
    doc = exported(adapter, out, trained_on=trained_on, flavor=flavor)
    assert_passed(doc)
    assert doc["foreign"] == {"peft": doc["lineage"]["adapters"][0]["foreign"]}
    assert doc["foreign"]["peft"]["trained_on"] == trained_on
    assert doc["lineage"]["adapters"][0]["manifest_sha256"] is None
    assert doc["lineage"]["adapters"][0]["base"]["model"] == str(bases(family))
    # 4-bit: merged onto the dequantized weights the adapter was trained against; full precision: the original ones
    assert doc["merge"]["into"] == ("dequantized" if trained_on == "nf4" else "original")
    if flavor == "merged":
        errors = doc["merge"]["vs_trained_model"]
        assert errors[doc["merge"]["into"]]["max_abs_logit_diff"] < 1e-4
        if trained_on == "nf4":  # the adapter changes the model: the 4-bit base alone is far from it
            assert errors["original"]["max_abs_logit_diff"] > 1e-2
    text = lineage.render(lineage.inspect(out))
    assert f"foreign PEFT adapter, trained on {trained_on}" in text and "[matches]" in text


@pytest.mark.slow
def test_the_adapter_changes_what_the_export_computes(llama_adapter, bases, tmp_path):
    """A merged export of the adapter and the base alone disagree: the delta reached the graph."""
    from edge_lora import runtime

    out = tmp_path / "x"
    exported(llama_adapter, out, trained_on="fp32", graph="torch")
    ids = [1, 20, 30, 40]
    base = torch.tensor(runtime_free_logits(bases("llama"), ids))
    assert (torch.tensor(runtime.load(out).logits(ids)) - base).abs().max() > 1e-2


def runtime_free_logits(base_dir: Path, ids: list[int]):
    from edge_lora.train.reference import full_precision_base

    with torch.no_grad():
        return full_precision_base(base_dir)(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        dict(rank_pattern={"q_proj": 8, "down_proj": 2}, alpha_pattern={"v_proj": 32}),
        dict(use_rslora=True, r=8, lora_alpha=4),
        dict(use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
    ],
    ids=["patterns", "rslora", "dora"],
)
@pytest.mark.parametrize("trained_on", ["fp32", "nf4"])
def test_per_module_scaling_and_dora_merge_exactly(bases, tmp_path, config, trained_on):
    """rank_pattern, alpha_pattern and rsLoRA change each module's scaling; DoRA rescales the merged weight."""
    adapter = peft_adapter(bases("llama"), tmp_path / "peft", **config)
    doc = exported(adapter, tmp_path / "x", trained_on=trained_on, graph="torch")
    assert_passed(doc)
    assert doc["merge"]["vs_trained_model"][doc["merge"]["into"]]["max_abs_logit_diff"] < 1e-4
    assert doc["source_adapter"]["manifest"]["lora"]["rank_pattern"] == config.get("rank_pattern", {})


@pytest.mark.slow
def test_several_peft_adapters_share_one_base_graph(bases, tmp_path):
    a = peft_adapter(bases("llama"), tmp_path / "a", seed=1)
    b = peft_adapter(bases("llama"), tmp_path / "b", seed=2, target_modules=["q_proj", "v_proj"], r=2)
    out = tmp_path / "x"
    export([a, b], out, ExportOptions(trained_on="nf4", flavor="adapters"), show_progress=False)
    doc = json.loads((out / "export.json").read_text())
    assert_passed(doc)
    assert set(doc["parity"]) == {"a", "b", "base"} and set(doc["foreign"]) == {"a", "b"}


@pytest.mark.slow
def test_dora_cannot_be_kept_apart(bases, tmp_path):
    adapter = peft_adapter(bases("llama"), tmp_path / "peft", use_dora=True, target_modules=["q_proj"])
    with pytest.raises(UsageError, match="DoRA adapters cannot be kept apart.*--flavor merged"):
        export(adapter, tmp_path / "x", ExportOptions(trained_on="fp32", flavor="adapters"), show_progress=False)


# ---- refusals -------------------------------------------------------------------------------------------------


def refused(adapter_dir: Path, tmp_path: Path, *fragments: str, **options) -> None:
    with pytest.raises(UsageError) as caught:
        export(adapter_dir, tmp_path / "x", ExportOptions(**{"trained_on": "nf4"} | options), show_progress=False)
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert not (tmp_path / "x").exists()


def test_modules_to_save_is_refused(bases, tmp_path):
    adapter = peft_adapter(bases("llama"), tmp_path / "peft", target_modules=["q_proj"], modules_to_save=["lm_head"])
    refused(adapter, tmp_path, "modules_to_save ['lm_head']", "merge_and_unload")


def test_lora_on_embeddings_is_refused(bases, tmp_path):
    adapter = peft_adapter(bases("llama"), tmp_path / "peft", target_modules=["embed_tokens", "q_proj"])
    refused(adapter, tmp_path, "LoRA on an embedding layer", "leave out the embeddings")


def test_trained_biases_are_refused(bases, tmp_path):
    adapter = peft_adapter(bases("gpt2"), tmp_path / "peft", target_modules=["c_attn"], bias="all")
    refused(adapter, tmp_path, "bias 'all'", "retrain with bias 'none'")


def test_a_stray_tensor_is_refused(llama_adapter, tmp_path):
    """Whatever adapter_config.json says, a tensor that is no LoRA weight would be lost in the merge."""
    from safetensors.torch import load_file, save_file

    adapter = Path(shutil.copytree(llama_adapter, tmp_path / "peft"))
    tensors = load_file(adapter / "adapter_model.safetensors") | {"base_model.model.lm_head.weight": torch.ones(2)}
    save_file(tensors, adapter / "adapter_model.safetensors")
    refused(adapter, tmp_path, "base_model.model.lm_head.weight is not a LoRA weight")


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
        ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
        ({"lora_bias": True}, "lora_bias True"),
        ({"layer_replication": [[0, 2]]}, "retrain without layer_replication"),
    ],
)
def test_other_adapter_kinds_are_refused(llama_adapter, tmp_path, change, fragment):
    adapter = Path(shutil.copytree(llama_adapter, tmp_path / "peft"))
    config = json.loads((adapter / "adapter_config.json").read_text()) | change
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refused(adapter, tmp_path, fragment)


def test_several_adapters_in_one_dir_are_refused(bases, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bases("llama"), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"]), adapter_name="first")
    peft_model.add_adapter("second", LoraConfig(target_modules=["v_proj"]))
    peft_model.save_pretrained(tmp_path / "both")
    assert not (tmp_path / "both" / "adapter_config.json").exists()
    refused(tmp_path / "both", tmp_path, "several PEFT adapters, in subdirs first, second", "pass one subdir")


def test_an_adapter_for_another_base_is_refused(llama_adapter, bases, tmp_path):
    """Target modules the base lacks: PEFT's error becomes one line naming the adapter and the fix."""
    with pytest.raises(UsageError, match=r"does not fit this base \(Target modules .* not found .* with --base"):
        export(llama_adapter, tmp_path / "x", ExportOptions(trained_on="fp32"), base=str(bases("gpt2")))


def test_tensors_for_modules_the_base_lacks_are_refused(llama_adapter, tmp_path):
    """Some of the adapter's layers missing from the base: PEFT would load the rest and drop those silently."""
    from safetensors.torch import load_file, save_file

    adapter = Path(shutil.copytree(llama_adapter, tmp_path / "peft"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    extra = "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"  # the base has layers 0 and 1
    save_file(tensors | {extra: torch.ones(4, 64)}, adapter / "adapter_model.safetensors")
    refused(
        adapter, tmp_path, "does not fit this base (unexpected adapter key", "layers.9", "--base", trained_on="fp32"
    )


def test_a_base_stored_quantized_is_refused(llama_adapter, bases, tmp_path):
    """QLoRA tools often train on a pre-quantized checkpoint ("-bnb-4bit"): its full-precision weights are gone."""
    base = Path(shutil.copytree(bases("llama"), tmp_path / "llama-bnb-4bit"))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(UsageError, match=r"stored quantized \(bitsandbytes\) — pass the full-precision model"):
        export(llama_adapter, tmp_path / "x", ExportOptions(trained_on="nf4"), base=str(base))


def test_trained_on_is_asked_for(llama_adapter, tmp_path):
    done = edge_lora("export", llama_adapter, "--output", tmp_path / "x")
    assert_one_line_error(done, "has no edge_lora.json", "--trained-on {nf4|fp4|bf16|fp16|fp32}", "nf4 for a QLoRA")


def test_trained_on_is_refused_for_an_edge_lora_adapter(llama_adapter, bases, tmp_path):
    from edge_lora.train import manifest

    adapter = Path(shutil.copytree(llama_adapter, tmp_path / "own"))
    fingerprint = manifest.fingerprint(bases("llama"))
    own = replace(manifest.foreign(adapter, str(bases("llama")), fingerprint, "nf4"), foreign=None)
    own.save(adapter)  # an edge_lora.json of its own, as edge-lora train writes one
    done = edge_lora("export", adapter, "--output", tmp_path / "x", "--trained-on", "nf4")
    assert_one_line_error(done, "--trained-on is for adapter dirs without edge_lora.json", "drop --trained-on")


@pytest.mark.slow  # four processes that import transformers
def test_bad_trained_on_and_missing_base_through_the_cli(llama_adapter, tmp_path):
    done = edge_lora("export", llama_adapter, "--output", tmp_path / "x", "--trained-on", "int8")
    assert done.returncode == 2 and "'int8' is not one of" in done.stderr
    adapter = Path(shutil.copytree(llama_adapter, tmp_path / "moved"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
    done = edge_lora("export", adapter, "--output", tmp_path / "x", "--trained-on", "fp32")
    assert_one_line_error(done, "names no base_model_name_or_path", "--base")
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/not-here"}))
    done = edge_lora("export", adapter, "--output", tmp_path / "x", "--trained-on", "fp32")
    assert_one_line_error(
        done, "names base 'org/not-here': not a local directory", "pass the base model dir with --base"
    )
    done = edge_lora("export", tmp_path / "nothing", "--output", tmp_path / "x", "--trained-on", "fp32")
    assert_one_line_error(done, "does not exist")
    (tmp_path / "empty").mkdir()
    done = edge_lora("export", tmp_path / "empty", "--output", tmp_path / "x")
    assert_one_line_error(done, "has neither edge_lora.json nor adapter_config.json", "a PEFT adapter dir")


@pytest.mark.slow
def test_the_cli_exports_a_qlora_adapter_with_its_quant_settings(llama_adapter, tmp_path):
    out = tmp_path / "x"
    done = edge_lora(
        "export", llama_adapter, "--output", out, "--trained-on", "fp4", "--no-double-quant",
        "--compute-dtype", "bfloat16", "--graph", "torch", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "parity merged: max |Δlogit|" in done.stdout
    doc = json.loads((out / "export.json").read_text())
    quant = doc["source_adapter"]["manifest"]["training"]["quant"]
    assert quant == {"quant_type": "fp4", "double_quant": False, "compute_dtype": "bfloat16", "block_size": 64}
    assert doc["options"]["trained_on"] == "fp4" and doc["foreign"]["peft-llama"]["trained_on"] == "fp4"
    assert_passed(doc)
