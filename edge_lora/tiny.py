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


def llama_config(**overrides):
    """A Llama config small enough to train in a minute on two CPU cores."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_base_model(out_dir: str | Path, config=None, seed: int = 0) -> Path:
    """Save a random-weight causal LM and the character tokenizer as a normal HF model directory."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    config = config or llama_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # from_config leaves the default init (std 0.02): a stand-in for pretrained weights of that scale.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out_dir)
    char_tokenizer().save_pretrained(out_dir)
    return out_dir
