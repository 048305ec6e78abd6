"""What of a PEFT adapter dir edge-lora can export: plain LoRA on linear layers — any rank and alpha per module
(`rank_pattern`, `alpha_pattern`), rsLoRA, DoRA (merged) — since the merge and the adapter files take each layer's
own scaling from PEFT (module.scaling). Everything else an adapter may hold — trained copies of whole layers
(`modules_to_save`), biases, LoRA on embeddings, initializations that change the base, other adapter types — is
refused here, before any model loads, with one line naming it and the fix."""

from __future__ import annotations

import json
from pathlib import Path

from edge_lora.errors import UsageError
from edge_lora.formats import ADAPTER_WEIGHTS
from edge_lora.train.manifest import PEFT_CONFIG

# adapter_config.json keys of LoRA variants whose weights the merge and the graphs do not compute; set (truthy),
# the adapter is refused.
VARIANTS = (
    "lora_bias",
    "target_parameters",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "megatron_config",
    "velora_config",
    "monteclora_config",
)
# init_lora_weights values that change the base weights along with the adapter (PiSSA, OLoRA, CorDA, LoftQ): the
# adapter then fits a base that is not the one it names.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
LORA_TENSORS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector")  # what a plain LoRA/DoRA adapter file holds
RETRAIN = "retrain without it, or merge with PEFT (merge_and_unload), save that model and export it as a base"


def check_peft_adapter(adapter_dir: Path) -> None:
    """Nothing when `adapter_dir` holds one adapter edge-lora can export (or is no PEFT dir at all: the manifest
    reader says what is missing); UsageError naming the first thing it cannot export otherwise."""
    config_path = adapter_dir / PEFT_CONFIG
    if not config_path.is_file():
        subdirs = sorted(p.parent.name for p in adapter_dir.glob(f"*/{PEFT_CONFIG}"))
        if subdirs:
            raise UsageError(
                f"{adapter_dir} holds several PEFT adapters, in subdirs {', '.join(subdirs)} — pass one subdir "
                f"(e.g. {adapter_dir / subdirs[0]}), or several with --flavor adapters"
            )
        return
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{config_path} cannot be read ({e}) — restore it, or save the adapter again") from None
    check_config(config_path, config)
    check_tensors(adapter_dir / ADAPTER_WEIGHTS)


def check_config(config_path: Path, config: dict) -> None:
    """adapter_config.json asks for plain LoRA (or DoRA) on layers' weights alone."""
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise UsageError(f"{config_path}: peft_type {kind!r} — edge-lora exports LoRA adapters only")
    if config.get("modules_to_save"):
        raise UsageError(
            f"{config_path}: modules_to_save {config['modules_to_save']} (whole layers trained beside the LoRA) — "
            f"edge-lora exports LoRA weights only; {RETRAIN}"
        )
    if config.get("bias", "none") != "none":
        raise UsageError(
            f"{config_path}: bias {config['bias']!r} (trained biases) — edge-lora exports LoRA weights only; "
            f"retrain with bias 'none'"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise UsageError(
            f"{config_path}: init_lora_weights {init!r} changes the base weights too — save the adapter with PEFT's "
            "path_initial_model_for_weight_conversion, which makes it fit the original base, and export that"
        )
    variant = next((key for key in VARIANTS if config.get(key)), None)
    if variant:
        raise UsageError(
            f"{config_path}: {variant} {config[variant]!r} — edge-lora's merge and graphs compute plain LoRA "
            f"(and DoRA) on linear layers only; retrain without {variant}"
        )


def check_tensors(weights: Path) -> None:
    """The adapter file holds LoRA pairs (and DoRA magnitudes) alone: no embedding LoRA, no whole layers."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError):
        return  # inputs.check_adapter_weights says what is wrong with the file
    embedding = next((n for n in names if "lora_embedding_" in n), None)
    if embedding is not None:
        raise UsageError(
            f"{weights}: {embedding} is LoRA on an embedding layer — edge-lora merges LoRA on linear layers only; "
            "retrain with target_modules that leave out the embeddings"
        )
    other = next((n for n in names if not any(part in n for part in LORA_TENSORS)), None)
    if other is not None:
        raise UsageError(f"{weights}: tensor {other} is not a LoRA weight (a trained layer or bias) — {RETRAIN}")
