"""Tiny models built from a config in code, with random weights, for the demo and the tests.

Nothing here downloads anything: the tokenizer is a character-level `tokenizers` tokenizer over printable
ASCII, and the model is a real transformers architecture at a small size.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# Printable ASCII without the vertical-space characters, so that every character is one token.
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " "
# Rounded up to a multiple of 32: embedding rows then split evenly into NF4 and MatMulNBits blocks.
VOCAB_SIZE = 128


def char_tokenizer():
    """A `transformers.PreTrainedTokenizerFast` with one token per character, `<s>` prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


# What every tiny config shares: the character tokenizer's ids, a context the tests and demo fit in, and
# weights at std 0.1, large enough that LoRA on a frozen random base becomes confident in a few steps.
COMMON = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
CONTEXT = 256


def llama_config(**overrides):
    """A Llama config small enough to train in a minute on two CPU cores."""
    from transformers import LlamaConfig

    kwargs = dict(
        COMMON,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


# The reference shape of the benches' speed figures: SmolLM2-135M's (a Llama), with random weights, since speed does
# not depend on weight values.
SMOLLM2_135M_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)


# The families the tests carry through train → adapter → merged ONNX → runtime, each at hidden 64, 2 layers,
# with what sets it apart from Llama kept: the point is to exercise each architecture's own layers.

# The shape every tiny family shares (GPT-2 names these differently and spells them out itself).
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=CONTEXT,
)


def tiny_llama(**overrides):
    return llama_config(**{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2} | overrides)


def tiny_mistral(**overrides):
    from transformers import MistralConfig

    # sliding_window=None: a window wider than the context changes nothing but the attention mask code path.
    return MistralConfig(**COMMON | TINY | dict(sliding_window=None) | overrides)


def tiny_qwen2(**overrides):
    from transformers import Qwen2Config

    # Qwen2's q/k/v projections carry a bias; small Qwen2 models tie the output head to the embeddings.
    return Qwen2Config(**COMMON | TINY | dict(tie_word_embeddings=True) | overrides)


def tiny_phi3(**overrides):
    from transformers import Phi3Config

    # Phi-3 fuses q/k/v into one qkv_proj and gate/up into one gate_up_proj.
    return Phi3Config(**COMMON | TINY | dict(original_max_position_embeddings=CONTEXT) | overrides)


def tiny_gemma(**overrides):
    from transformers import GemmaConfig

    # Gemma: tied embeddings scaled by sqrt(hidden), RMSNorm with (1 + weight), and a head_dim (32) that is not
    # hidden / heads (16), as in the real models.
    return GemmaConfig(**COMMON | TINY | dict(head_dim=32, tie_word_embeddings=True) | overrides)


def tiny_gpt2(**overrides):
    from transformers import GPT2Config

    # GPT-2: Conv1D layers (weights stored (in, out)), learned absolute positions, LayerNorm, tied head. No
    # dropout, so that a short training run moves the adapter as much as it can.
    return GPT2Config(
        **COMMON
        | dict(
            n_embd=64,
            n_inner=128,
            n_layer=2,
            n_head=4,
            n_positions=CONTEXT,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        | overrides
    )


FAMILIES = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "phi3": tiny_phi3,
    "gemma": tiny_gemma,
    "gpt2": tiny_gpt2,
}
"""Family name → function(**overrides) returning a tiny config of that architecture."""


def build_base_model(out_dir: str | Path, config=None, seed: int = 0) -> Path:
    """Save a random-weight causal LM and the character tokenizer as a normal HF model directory."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    config = config or llama_config()
    torch.manual_seed(seed)
    # Weights drawn at the config's initializer_range: a stand-in for pretrained weights of that scale.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out_dir)
    char_tokenizer().save_pretrained(out_dir)
    return out_dir
