"""Load a base causal LM with frozen 4-bit weights (bitsandbytes) and attach LoRA adapters (PEFT)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.errors import UsageError
from edge_lora.train.config import LoraConfig, QuantConfig

if TYPE_CHECKING:
    import torch

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# bitsandbytes tries, at import, to fetch an optional CPU kernel from a hub and warns when it cannot; it then
# uses its built-in kernels, which is what edge-lora wants offline. The warning would only confuse users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def resolve_model_dir(model: str) -> Path:
    """A local model directory, or the local snapshot of a hub id (downloaded if the hub is reachable)."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--model {model} is a file — pass the model's directory (config.json and weights)")
        if not (path / "config.json").exists():
            raise UsageError(f"--model {model} has no config.json — pass a Hugging Face model directory")
        if not any(p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)):
            raise UsageError(
                f"--model {model} has no weights (*.safetensors or pytorch_model*.bin) — "
                "save the model with save_pretrained first"
            )
        return path
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise UsageError(f"--model {model} does not exist — pass a model directory or a hub id like org/name")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # the hub client raises many types; all mean the same to the user
        raise UsageError(
            f"--model {model}: not a local directory and the hub could not provide it "
            f"({type(e).__name__}) — download it and pass the directory"
        ) from None


def compute_dtype(quant: QuantConfig):
    import torch

    if quant.compute_dtype != "auto":
        return getattr(torch, quant.compute_dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # A CPU with bf16 instructions (AVX512-BF16, AMX) multiplies bf16 several times faster than fp32, and bf16
    # training beats fp32 there (BENCHMARKS.md, Training). Elsewhere bf16 would be emulated, and fp32 is both
    # faster and exact.
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), by torch's own probes (private ones: a torch
    without them counts as no)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def bnb_config(quant: QuantConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(quant),
    )


def load_quantized_base(model_dir: Path, quant: QuantConfig):
    """The base model with every linear layer but the output head stored in 4-bit; norms and embeddings
    stay in the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=bnb_config(quant), dtype=compute_dtype(quant), device_map=device_map
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not recognize this architecture" in str(e):
            raise UsageError(f"--model {model_dir}: not a causal language model transformers knows ({e})") from None
        raise
    if quant.block_size != DEFAULT_BLOCK_SIZE:
        requantize(model, model_dir, quant)
    return keep_training_numerics(model)


DEFAULT_BLOCK_SIZE = 64  # what bitsandbytes' transformers integration quantizes with; it has no option for it


def requantize(model, model_dir: Path, quant: QuantConfig) -> None:
    """Quantize every 4-bit layer again at `quant.block_size`, from the checkpoint's full-precision weight.

    transformers' bitsandbytes loader always uses blocks of 64. Re-quantizing its dequantized weights would
    stack a second rounding on the first, so each layer is quantized from the original tensor instead.
    """
    import bitsandbytes as bnb
    import torch
    from safetensors import safe_open
    from transformers.pytorch_utils import Conv1D

    if quant.block_size == 1024 and not torch.cuda.is_available():
        # bitsandbytes 0.50's CPU dequantize_4bit is wrong at blocksize 1024 (quantize is right): its mean
        # error is twice that of 512 or 2048, and up to 1.26 off the codebook value times absmax.
        raise UsageError(
            "quant.block_size=1024 dequantizes wrongly in bitsandbytes' CPU kernel — use 512 or 2048 on a CPU"
        )
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(
            f"quant.block_size={quant.block_size} needs the model's *.safetensors weights; "
            f"{model_dir} has none — use block_size 64"
        )
    where = {name: file for file in files for name in safe_open(file, framework="pt").keys()}
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        key = f"{name}.weight"
        if key not in where:
            key = key.removeprefix(f"{model.base_model_prefix}.")
        with safe_open(where[key], framework="pt") as f:
            original = f.get_tensor(key).to(compute_dtype(quant))  # as the loader casts before quantizing
        if issubclass(getattr(module, "source_cls", torch.nn.Linear), Conv1D):
            original = original.T  # a Conv1D stores (in, out); Linear4bit holds (out, in), as the loader made it
        weight = module.weight
        module.weight = bnb.nn.Params4bit(
            original.contiguous(),
            requires_grad=False,
            blocksize=quant.block_size,
            compress_statistics=quant.double_quant,
            quant_type=quant.quant_type,
            quant_storage=weight.quant_storage,
            module=module,
        ).to(weight.device)


def keep_training_numerics(model):
    """Make every 4-bit layer compute as it does in training, in eval mode too.

    On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight the first time it runs in eval mode
    without grad and from then on multiplies in bf16: the same adapter then gives other logits after an eval
    pass than during training (|Δ| ~1e-2 here), and a merge could no longer be checked against it. Keeping the
    dequantize-then-fp32 path everywhere makes evaluation, generation and the export's reference all compute
    what the adapter was trained against.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    weight.data, weight.quant_state
                )
    return model


def linear_layer_names(model) -> list[str]:
    """Short names of the linear layers LoRA can target (the output head excluded)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
    }
    return sorted(names)


def peft_config(lora: LoraConfig, model):
    from peft import LoraConfig as PeftLoraConfig

    targets = list(lora.target_modules)
    if targets != ["all-linear"]:
        available = linear_layer_names(model)
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise UsageError(
                f"lora.target_modules: {', '.join(unknown)} not among this model's linear layers — "
                f"choose from {', '.join(available)} or use all-linear"
            )
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(base, lora: LoraConfig, gradient_checkpointing: bool = False):
    from peft import get_peft_model, prepare_model_for_kbit_training

    # Casts norms to fp32 and makes the embeddings' output require grad, so that checkpointed blocks see a
    # tensor that needs grad: the reentrant checkpoint variant sends gradients to the LoRA weights inside a block
    # only through its inputs. Reentrant rather than non-reentrant: faster and with a lower peak RSS
    # (BENCHMARKS.md, Training), and the same adapter either way (tests/train/test_distributed.py), under torchrun
    # too.
    base = prepare_model_for_kbit_training(
        base, use_gradient_checkpointing=gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": True}
    )
    return get_peft_model(base, peft_config(lora, base))


def sum_lora_in_place(model) -> None:
    """Give PEFT's 4-bit LoRA layers a leaner forward for training: the LoRA term goes into the 4-bit layer's
    output in place (`add_` with the scaling as alpha) instead of PEFT's clone, multiply and add — per layer and
    step, two passes over the activations and two temporaries fewer: faster and with a lower peak RSS than PEFT's
    forward (BENCHMARKS.md, Training).

    PEFT clones because an in-place change to a view that an autograd Function returned fails in backward; such
    an output is cloned here too. DoRA and other variants, several active adapters, merged or disabled adapters
    and per-call adapter names keep PEFT's own forward.
    """
    from types import MethodType

    import torch
    from peft.tuners.lora.bnb import Linear4bit

    def forward(self, x, *args, **kwargs):
        names = self.active_adapters
        if args or kwargs or self.disable_adapters or self.merged or len(names) != 1:
            return type(self).forward(self, x, *args, **kwargs)
        name = names[0]
        if name not in self.lora_A or name in self.lora_variant:
            return type(self).forward(self, x, *args, **kwargs)
        result = self.base_layer(x)
        delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))
        if result._base is not None:
            result = result.clone()
        if torch.result_type(result, delta) != result.dtype:  # a bf16/fp16 output and an fp32 term (no autocast)
            return result + delta * self.scaling[name]
        return result.add_(delta, alpha=self.scaling[name])

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.forward = MethodType(forward, module)


def mixed_precision(model, dtype):
    """Set `model` (from add_lora) up to train in `dtype` and return the autocast context its forward passes
    run in.

    In bf16 or fp16 the LoRA weights stay fp32 (the optimizer's master copy) and autocast runs their matmuls in
    the compute dtype. PEFT would cast every LoRA input to fp32 and its output back — it looks only at CUDA's
    autocast state — so that cast is turned off. In bf16 the frozen norms, embeddings and head, which
    prepare_model_for_kbit_training upcast to fp32, go back to bf16: the residual stream then stays in bf16
    instead of being cast around every 4-bit layer (the norms still reduce in fp32 inside); both make bf16
    training faster and smaller (BENCHMARKS.md, Training). fp16 keeps them in fp32: its range is too narrow for a
    residual stream.
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    if dtype == torch.float32:
        return torch.autocast(model.device.type, enabled=False)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
    if dtype == torch.bfloat16:
        for param in model.parameters():
            if not param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(dtype)
    return torch.autocast(model.device.type, dtype=dtype)


# The weights the adapter was trained against, read back from the 4-bit layers (export merges into them).


def dequantized_weight(layer) -> torch.Tensor:
    """The fp32 weight a bitsandbytes 4-bit layer computes with (the NF4/FP4 codes times their block scales)."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()


def made_from_conv1d(layer) -> bool:
    """Whether transformers made this 4-bit layer from a Conv1D (GPT-2): it then quantized the weight transposed
    to (out, in), while the model's parameter of that name is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    source = getattr(layer, "source_cls", None)  # set by transformers' bitsandbytes integration
    return source is not None and issubclass(source, Conv1D)


def dequantized_weights(model) -> dict[str, torch.Tensor]:
    """{base parameter name: fp32 weight} of every 4-bit layer, in the layout of the base model's parameter:
    the weights the adapter was trained against, LoRA target or not."""
    import bitsandbytes as bnb

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantized_weight(module)  # (out, in), whatever layer it was made from
            param = base_param_name(name.removesuffix(".base_layer"))
            weights[param] = weight.T if made_from_conv1d(module) else weight
    return weights


def base_param_name(peft_module_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj.weight'."""
    prefix = "base_model.model."
    name = peft_module_name[len(prefix) :] if peft_module_name.startswith(prefix) else peft_module_name
    return name + ".weight"
