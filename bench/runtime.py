"""Runtime benchmark: edge-lora's onnxruntime runtime against llama.cpp and onnxruntime-genai,
on the same random weights, shape, prompt and threads, as ratios measured side by side in one run.

    .venv/bin/python bench/runtime.py                  # the reference shape (SmolLM2-135M-shaped Llama), 2 threads
    .venv/bin/python bench/runtime.py --quick          # a tiny model, about a minute once built
    .venv/bin/python bench/runtime.py --profile        # also trace one edge-lora generation and break it down

The systems, each in its own process (so that its peak RSS, `ru_maxrss`, is its own):

- `edge_lora`: `edge_lora.runtime.load(export, threads=N).generate(...)` on an `edge-lora export --precision int4
  --graph torch` (torch's ONNX exporter: what architectures the builder lacks get) of a 1-step LoRA adapter
  (r 16, every linear layer) merged into the base.
- `edge_lora_builder`: the same, on `edge-lora export --precision int4 --graph builder` (onnxruntime-genai's model
  builder writes the merged model: GroupQueryAttention over a KV buffer bound once per generation as past and
  present, the tied embedding shared with the int4 head, the head run on the prompt's last position alone).
  Every edge-lora export quantizes int4 in blocks of `--int4-block-size`: 64 by default, as the CPU device
  profiles do, which stores 4.5 bits a weight (fp32 scales), as Q4_0 does (fp16 scales over 32); genai's
  builder defaults to 32 (5 bits). Larger blocks run faster and round more coarsely.
  Where the export carries a graph for edge-lora's int4 kernel (export/kernel_graphs/q4.py: the x86 CPU profile lists
  `matmul_q4`) and the kernel builds on the host, the runtime runs that graph, and so does this system.
- `edge_lora_builder_portable`, `edge_lora_builder_adapters_portable`: the same two exports on their portable
  graphs (`runtime.load(..., kernels=())`): onnxruntime's MatMulNBits, as genai runs.
- `edge_lora_builder_adapters_lora`: the adapters export on its graph for edge-lora's LoRA op
  (`runtime.load(..., kernels=("lora_add",))`, export/kernel_graphs/lora_add.py): the portable graph's MatMulNBits
  with each projection's LoRA branches in one LoraAdd node — what a host without AVX-512 VNNI runs (an AVX2 laptop,
  an Arm board), to be compared with `edge_lora_builder_portable`, the merged model there.
- `edge_lora_adapters`: the same adapter kept apart (`--flavor adapters`), active through `with_adapter` (the
  LoRA MatMuls stay fp32: the exporter leaves them out of int4 quantization).
- `edge_lora_builder_adapters`: the same, on the builder graph (`--flavor adapters --graph builder`).
- `llamacpp`: llama-cpp-python's `Llama.generate` (greedy sampler, its defaults otherwise: flash attention off)
  on a GGUF written by llama.cpp's own `convert_hf_to_gguf.py` (f32) and `llama_model_quantize` to Q4_0 (its
  default mixture: the tied output/embedding tensor wants Q6_K and, 576 not being a multiple of 256, falls back
  to Q8_0). The converter comes from the llama.cpp sources in llama-cpp-python's sdist (fetched once with
  `pip download`, or `--llama-cpp-src DIR`). The base carries a byte-level BPE tokenizer with GPT-2's
  pre-tokenizer, for which llama.cpp has no hash of its own; the converter is told it is "gpt-2". Weight values are
  the base's; no text is ever tokenized. On a CPU with AMX, llama-cpp-python must
  be built without ggml's AMX kernels (BENCHMARKS.md, "Runtime"): 0.3.36's AMX matmul crashes on these models.
- `genai`: onnxruntime-genai's `Generator` on the graph of its own model builder (`python -m
  onnxruntime_genai.models.builder -i BASE -o OUT -p int4 -e cpu`, its defaults), threads set by a config overlay.

The merged systems run the base with the merged adapter, the GGUF and genai graphs the base alone: latency does
not depend on weight values. Every system gets the same prompts (random token ids, a new prompt per run so that
no prefix cache can help), decodes greedily and is forced to `--new-tokens` (end-of-sequence ignored).
TTFT is prompt in → first new token out (prefill + one sampling step); decode tok/s is the later tokens over
their time. After `--warmup` untimed generations in each process, the parent runs `--runs` rounds, and in each
round every system generates once, one after the other in a rotating order, so that all see the same load.
A run counts as uncontended when its process kept its threads busy (CPU time ≥ 0.9 × threads × wall time);
the headline medians use uncontended runs when there are at least MIN_UNCONTENDED of them, all runs otherwise.

Built artifacts (base, adapter, exports, GGUF, genai graph) are cached under `--workdir`, one folder per shape, so
that reruns only measure. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edge_lora.formats import EXPORT_MANIFEST, LORA_ADD, MATMUL_Q4, ExportManifest
from edge_lora.tiny import SMOLLM2_135M_SHAPE

# The reference shape (SmolLM2-135M's), and a tiny one for checking the script.
REFERENCE = SMOLLM2_135M_SHAPE
QUICK = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    tie_word_embeddings=True,
    max_position_embeddings=256,
)

# The anchors' figures on a 2-core AMD EPYC (reference shape, prompt 128, 64 new tokens, 2 threads), against which
# vs_anchor_llamacpp_decode compares this host's llama.cpp.
ANCHOR = {
    "llamacpp_decode_tok_s": 197.0,
    "llamacpp_ttft_s": 0.14,
    "genai_decode_tok_s": (112.0, 125.0),
    "genai_ttft_s": 0.31,
}
SYSTEMS = (
    "edge_lora",
    "edge_lora_builder",
    "edge_lora_adapters",
    "edge_lora_builder_adapters",
    "llamacpp",
    "genai",
    "edge_lora_builder_portable",
    "edge_lora_builder_adapters_portable",
    "edge_lora_builder_adapters_lora",
)
PORTABLE = "_portable"  # the same export as the system without it, run on its portable graph (kernels=())
LORA = "_lora"  # the same export as the system without it, run on its graph for the LoRA op (kernels=("lora_add",))
MIN_UNCONTENDED = 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0–3, as edge_lora.tiny's configs expect
ADAPTER = "adapter"  # the adapter dir's name, which names the adapter in an `adapters` export


# ------------------------------------------------------------------------------------------------ artifacts


def bpe_tokenizer(vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` of exactly `vocab_size` tokens, trained on generated words.

    GPT-2's pre-tokenizer (ByteLevel with its regex), so that llama.cpp's "gpt-2" pre-tokenizer is the same split.
    """
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(60000)]
    lines = (" ".join(rng.choice(words) for _ in range(30)) for _ in range(20000))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE training reached {tok.get_vocab_size()} tokens, not {vocab_size}: generate more text")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_base(out: Path, shape: dict) -> None:
    from edge_lora.tiny import build_base_model, llama_config

    build_base_model(out, llama_config(**shape))
    bpe_tokenizer(shape["vocab_size"]).save_pretrained(out)  # replaces the character tokenizer


def build_adapter(work: Path, out: Path) -> None:
    from edge_lora.demo.task import write_task
    from edge_lora.train.config import TrainConfig
    from edge_lora.train.loop import train

    # One optimizer step: speed does not depend on what the adapter learned, only on its shapes (LoRA r 16 on
    # every linear layer, TrainConfig's defaults).
    train_path, _ = write_task(work / "data", n_train=16, n_eval=4)
    train(
        TrainConfig(
            model=str(work / "base"),
            data=str(train_path),
            output=str(out),
            max_steps=1,
            batch_size=4,
            learning_rate=1e-3,
        ),
        show_progress=False,
    )


def build_export(work: Path, out: Path, flavor: str, block_size: int, graph: str = "torch") -> None:
    from edge_lora.export import ExportOptions, export

    # No parity gate: on random weights with a 1-step adapter the next-token distributions are nearly flat and
    # int4 rounding flips greedy near-ties (bench/export.py, same reason).
    export(
        work / ADAPTER,
        out,
        ExportOptions(precision="int4", flavor=flavor, graph=graph, int4_block_size=block_size, validate=False),
        show_progress=False,
    )


def llama_cpp_sources(work: Path, given: str | None) -> Path:
    """A llama.cpp source tree holding convert_hf_to_gguf.py, conversion/ and gguf-py/."""
    if given:
        return Path(given)
    from importlib.metadata import version

    v = version("llama_cpp_python")
    src = work.parent / f"llama-cpp-python-{v}-src"
    if not (src / "convert_hf_to_gguf.py").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"llama-cpp-python=={v}",
                    "-d",
                    tmp,
                ],
                check=True,
            )
            sdist = next(Path(tmp).glob("*.tar.gz"))
            subprocess.run(
                [
                    "tar",
                    "xzf",
                    str(sdist),
                    "-C",
                    tmp,
                    "--wildcards",
                    "*/vendor/llama.cpp/convert_hf_to_gguf.py",
                    "*/vendor/llama.cpp/conversion/*",
                    "*/vendor/llama.cpp/gguf-py/*",
                ],
                check=True,
            )
            shutil.move(str(next(Path(tmp).glob("*/vendor/llama.cpp"))), src)
    return src


def build_gguf(work: Path, out: Path, src: Path) -> None:
    import ctypes

    import llama_cpp

    f32 = out.with_suffix(".f32.gguf")
    # The converter's own main(), with two changes to its vocabulary step: get_vocab_base_pre answers "gpt-2" for
    # this tokenizer (see the module docstring), and the SentencePiece attempt fails the way it does when
    # sentencepiece is installed and there is no tokenizer.model (FileNotFoundError), without needing the package.
    # Everything else (tensor names, the tied output, hyperparameters) is llama.cpp's own.
    driver = "\n".join(
        [
            "import runpy, sys",
            "import conversion.base as b",
            "def no_sentencepiece(self):",
            "    raise FileNotFoundError('no tokenizer.model')",
            "b.TextModel._create_vocab_sentencepiece = no_sentencepiece",
            "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'",
            f"sys.argv = ['convert_hf_to_gguf.py', {str(work / 'base')!r}, '--outfile', {str(f32)!r}, "
            "'--outtype', 'f32']",
            f"runpy.run_path({str(src / 'convert_hf_to_gguf.py')!r}, run_name='__main__')",
        ]
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(src / "gguf-py")])}
    subprocess.run([sys.executable, "-c", driver], check=True, env=env, stdout=subprocess.DEVNULL)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {f32}")
    f32.unlink()


def build_genai(work: Path, out: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(work / "base"),
            "-o",
            str(out),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(work / "genai-cache"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    shutil.rmtree(work / "genai-cache", ignore_errors=True)


def build_step(step: str, work: Path, args) -> None:
    """One artifact, built in a temporary path and renamed into place (export() does its own renaming)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    final = work / ARTIFACTS[step]
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if step == "base":
        build_base(tmp, QUICK if args.quick else REFERENCE)
    elif step == "adapter":
        build_adapter(work, tmp)
    elif step in EXPORT_ARTIFACTS:
        build_export(
            work,
            final,
            "adapters" if step.endswith("_adapters") else "merged",
            args.int4_block_size,
            graph="builder" if "builder" in step else "torch",
        )
        return
    elif step == "gguf":
        tmp.mkdir()
        build_gguf(work, tmp / final.name, llama_cpp_sources(work, args.llama_cpp_src))
        os.replace(tmp / final.name, final)
        tmp.rmdir()
        return
    elif step == "genai":
        build_genai(work, tmp)
    os.replace(tmp, final)


EXPORT_ARTIFACTS = {
    "edge_lora": "edge-int4",
    "edge_lora_builder": "edge-int4-builder",
    "edge_lora_adapters": "edge-int4-adapters",
    "edge_lora_builder_adapters": "edge-int4-builder-adapters",
}
# each suffixed with its block size (name_artifacts)
ARTIFACTS = {"base": "base", "adapter": ADAPTER, **EXPORT_ARTIFACTS, "gguf": "model-q4_0.gguf", "genai": "genai-int4"}


def graph_variant(system: str) -> str:
    """PORTABLE or LORA when `system` is an export system with that suffix, else "".

    A suffix counts only when what is left names an export system: "edge_lora" itself ends in "_lora".
    """
    for suffix in (PORTABLE, LORA):
        if system.endswith(suffix) and system.removesuffix(suffix) in EXPORT_ARTIFACTS:
            return suffix
    return ""


def export_system(system: str) -> str:
    """The system whose export `system` runs: itself, or itself without its graph variant's suffix."""
    variant = graph_variant(system)
    return system.removesuffix(variant) if variant else system


def kernels_for(system: str) -> tuple[str, ...] | None:
    """runtime.load's `kernels` for `system`: the default order (None), none (portable), or the LoRA op's alone."""
    return {PORTABLE: (), LORA: ("lora_add",)}.get(graph_variant(system))


def name_artifacts(int4_block_size: int) -> None:
    """Suffix the edge-lora exports' dirs with their block size, so that each size is built once and kept."""
    for system, name in EXPORT_ARTIFACTS.items():
        ARTIFACTS[system] = f"{name}-b{int4_block_size}"


def build_all(work: Path, systems: list[str]) -> None:
    artifact = {"llamacpp": "gguf"}  # the others' artifacts have their names
    artifact |= {s: export_system(s) for s in SYSTEMS if export_system(s) != s}
    needed = ["base", "adapter", *dict.fromkeys(artifact.get(s, s) for s in systems)]
    for system in (s for s in systems if graph_variant(s) == LORA):  # an export cached before the LoRA op's graph
        export_dir = work / ARTIFACTS[export_system(system)]
        if (export_dir / EXPORT_MANIFEST).exists() and LORA_ADD not in ExportManifest.load(export_dir).kernels:
            print(f"{export_dir} has no graph for the LoRA op: exporting it again", flush=True)
            shutil.rmtree(export_dir)
    for step in needed:
        if (work / ARTIFACTS[step]).exists():
            continue
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--build", step, "--workdir", str(work.parent)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"building {step} failed:\n{proc.stdout[-4000:]}")
        print(f"built {step:26} {time.perf_counter() - t0:6.1f} s  → {work / ARTIFACTS[step]}", flush=True)


# ------------------------------------------------------------------------------------------------- systems


def prompt_ids(seed: int, vocab_size: int, length: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(len(SPECIAL_TOKENS), vocab_size, length).tolist()


def open_edge_lora(work: Path, args, system: str):
    from edge_lora import runtime

    variant, kernels = graph_variant(system), kernels_for(system)
    system = export_system(system)
    g = runtime.load(work / ARTIFACTS[system], threads=args.threads, kernels=kernels)
    if variant != PORTABLE and system == "edge_lora_builder" and g.kernel is None:
        print(
            f"{system}: no kernel graph runs here (the export predates it, or the kernel does not build)",
            file=sys.stderr,
        )
    if variant == LORA and g.kernel != "lora_add":
        raise SystemExit(f"{system}{LORA}: the export has no graph for the LoRA op, or the op does not build here")
    adapters = system.endswith("_adapters")
    if adapters:
        g = g.with_adapter(ADAPTER)
    sampling = runtime.SamplingConfig(max_new_tokens=args.new_tokens, ignore_eos=True)

    def run(ids: list[int]) -> tuple[float, list[float]]:
        gen = g.generate(ids, sampling)
        return gen.ttft_s, gen.token_times_s

    return run


def open_llamacpp(work: Path, args):
    from llama_cpp import Llama

    llm = Llama(
        str(work / ARTIFACTS["gguf"]),
        n_ctx=args.prompt_tokens + args.new_tokens,
        n_batch=args.prompt_tokens,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )

    def run(ids: list[int]) -> tuple[float, list[float]]:
        stamps = [time.perf_counter_ns()]
        tokens = llm.generate(ids, temp=0.0)  # greedy; never stops by itself, so it is forced to new_tokens
        for _ in range(args.new_tokens):
            next(tokens)
            stamps.append(time.perf_counter_ns())
        tokens.close()
        return seconds_between(stamps)

    return run


def open_genai(work: Path, args):
    import onnxruntime_genai as og

    config = og.Config(str(work / ARTIFACTS["genai"]))
    config.overlay(
        json.dumps(
            {
                "model": {
                    "decoder": {"session_options": {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}
                }
            }
        )
    )
    model = og.Model(config)

    def run(ids: list[int]) -> tuple[float, list[float]]:
        params = og.GeneratorParams(model)
        total = len(ids) + args.new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)  # min_length masks EOS
        generator = og.Generator(model, params)
        stamps = [time.perf_counter_ns()]
        generator.append_tokens(ids)  # the prefill
        for _ in range(args.new_tokens):
            generator.generate_next_token()  # one decode step (the first only samples the prefill's logits)
            generator.get_next_tokens()
            stamps.append(time.perf_counter_ns())
        return seconds_between(stamps)

    return run


def seconds_between(stamps_ns: list[int]) -> tuple[float, list[float]]:
    """(TTFT, later token times) from the start stamp and one stamp per new token."""
    gaps = [(b - a) / 1e9 for a, b in zip(stamps_ns, stamps_ns[1:])]
    return gaps[0], gaps[1:]


def serve_child(system: str, work: Path, args) -> None:
    """A system's process: load, warm up, print "ready", then one generation per seed read from stdin."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr; stdout carries the protocol alone
    vocab = (QUICK if args.quick else REFERENCE)["vocab_size"]
    run = {
        "edge_lora": lambda: open_edge_lora(work, args, "edge_lora"),
        "edge_lora_builder": lambda: open_edge_lora(work, args, "edge_lora_builder"),
        "edge_lora_adapters": lambda: open_edge_lora(work, args, "edge_lora_adapters"),
        "edge_lora_builder_adapters": lambda: open_edge_lora(work, args, "edge_lora_builder_adapters"),
        "edge_lora_builder_portable": lambda: open_edge_lora(work, args, "edge_lora_builder_portable"),
        "edge_lora_builder_adapters_portable": lambda: open_edge_lora(
            work, args, "edge_lora_builder_adapters_portable"
        ),
        "edge_lora_builder_adapters_lora": lambda: open_edge_lora(work, args, "edge_lora_builder_adapters_lora"),
        "llamacpp": lambda: open_llamacpp(work, args),
        "genai": lambda: open_genai(work, args),
    }[system]()
    for i in range(args.warmup):
        run(prompt_ids(10_000 + i, vocab, args.prompt_tokens))
    protocol.write("ready\n")
    for line in sys.stdin:
        wall0, cpu0 = time.perf_counter_ns(), time.process_time_ns()
        ttft, token_s = run(prompt_ids(int(line), vocab, args.prompt_tokens))
        wall, cpu = (time.perf_counter_ns() - wall0) / 1e9, (time.process_time_ns() - cpu0) / 1e9
        protocol.write(json.dumps({"ttft_s": ttft, "token_s": token_s, "wall_s": wall, "cpu_s": cpu}) + "\n")


class Child:
    """A system's process, driven one generation at a time over its stdin/stdout."""

    def __init__(self, system: str, work: Path, argv: list[str]):
        self.system = system
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *argv, "--child", system, "--workdir", str(work.parent)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._stderr: list[str] = []
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        self._expect("ready")

    def _expect(self, what: str) -> str:
        line = self.proc.stdout.readline()
        if not line or (what == "ready" and line.strip() != "ready"):
            self.proc.wait()
            raise SystemExit(f"{self.system} process failed:\n{''.join(self._stderr)[-4000:]}")
        return line

    def generate(self, seed: int) -> dict:
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("result"))

    def close(self) -> float:
        """Ends the process; its peak RSS in MB (os.wait4 returns the rusage of that child alone)."""
        self.proc.stdin.close()
        _, status, usage = os.wait4(self.proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{self.system} process exited with {status}:\n{''.join(self._stderr)[-4000:]}")
        return usage.ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------------------------- measurement


def measure(work: Path, systems: list[str], args) -> tuple[dict, list[float]]:
    """Start every system (one at a time, each warming up alone), then `--runs` rounds in rotating order."""
    argv = [a for a in sys.argv[1:] if a != "--profile"]
    children = {}
    for system in systems:
        t0 = time.perf_counter()
        children[system] = Child(system, work, argv)
        print(f"ready {system:26} {time.perf_counter() - t0:6.1f} s (load + {args.warmup} warm-up runs)", flush=True)
    samples = {s: [] for s in systems}
    loads = []
    for r in range(args.runs):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        loads.append(os.getloadavg()[0])
        for system in order:
            samples[system].append(children[system].generate(seed=r))
        print(
            f"round {r + 1}/{args.runs}: "
            + ", ".join(f"{s} {decode_tok_s(samples[s][-1]):.0f} tok/s" for s in systems),
            flush=True,
        )
    results = {}
    for system in systems:
        runs = samples[system]
        quiet = [x for x in runs if x["cpu_s"] >= 0.9 * args.threads * x["wall_s"]]
        basis = quiet if len(quiet) >= MIN_UNCONTENDED else runs
        results[system] = {
            "ttft_s": statistics.median(x["ttft_s"] for x in basis),
            "decode_tok_s": statistics.median(decode_tok_s(x) for x in basis),
            "whole_run_tok_s": statistics.median(
                (1 + len(x["token_s"])) / (x["ttft_s"] + sum(x["token_s"])) for x in basis
            ),
            "peak_rss_mb": children[system].close(),
            "uncontended_runs": len(quiet),
            "runs": len(runs),
            "samples": [
                {
                    "ttft_s": round(x["ttft_s"], 5),
                    "decode_tok_s": round(decode_tok_s(x), 2),
                    "cpu_over_wall": round(x["cpu_s"] / x["wall_s"], 2),
                }
                for x in runs
            ],
        }
    return results, loads


def decode_tok_s(sample: dict) -> float:
    return len(sample["token_s"]) / sum(sample["token_s"])


def read_bandwidth_gb_s(threads: int, mb_per_thread: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth: the best over 1..`threads` threads, each taking the max of its own array (a
    streaming read; numpy releases the GIL), best of `repeats`. On a shared machine this is a lower bound."""
    import numpy as np

    arrays = [np.ones(mb_per_thread * (1 << 20) // 4, dtype=np.float32) for _ in range(threads)]
    best = 0.0
    for n in range(1, threads + 1):
        for _ in range(repeats):
            workers = [threading.Thread(target=a.max) for a in arrays[:n]]
            t0 = time.perf_counter_ns()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = max(best, n * mb_per_thread * (1 << 20) / ((time.perf_counter_ns() - t0) / 1e9) / 1e9)
    return best


def onnx_bytes_per_token(model_path: Path) -> int:
    """Bytes of the initializers a decode step reads, as edge-lora's export counts them (export/graphs/weight_bytes.py):
    one row of a table only a Gather reads (through Reshapes: a shared embedding's), all of every other."""
    from edge_lora.export.graphs.weight_bytes import read_graph_weights

    return read_graph_weights(model_path).bytes_per_token


def gguf_bytes_per_token(path: Path, src: Path) -> int:
    """Every tensor: the tied token_embd is the output matrix too, read whole on each token."""
    sys.path.insert(0, str(src / "gguf-py"))
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def files_mb(*paths: Path) -> float:
    return sum(p.stat().st_size for p in paths if p.exists()) / 1e6


# ----------------------------------------------------------------------------------------------- profiling


def profile_child(work: Path, args) -> None:
    """Trace one edge-lora generation (after warm-ups) with onnxruntime's profiler; write work/profile.json."""
    from edge_lora import runtime
    from edge_lora.runtime.profile.trace import summarize_trace

    vocab = (QUICK if args.quick else REFERENCE)["vocab_size"]
    export = work / ARTIFACTS["edge_lora"]
    (work / "profile").mkdir(exist_ok=True)
    g = runtime.load(export, threads=args.threads, profile_file_prefix=str(work / "profile" / "edge_lora"))
    sampling = runtime.SamplingConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    for i in range(args.warmup):
        g.generate(prompt_ids(10_000 + i, vocab, args.prompt_tokens), sampling)
    gen = g.generate(prompt_ids(0, vocab, args.prompt_tokens), sampling)
    trace = Path(g.session.end_profiling())
    breakdown = trace_breakdown(trace, export / "model.onnx", runs=args.new_tokens)
    breakdown["wall_ms_per_decode_token"] = 1e3 * sum(gen.token_times_s) / len(gen.token_times_s)
    breakdown["ttft_ms"] = 1e3 * gen.ttft_s
    breakdown["top_ops_decode"] = summarize_trace(trace, last_runs=args.new_tokens - 1)["top_ops"]
    (work / "profile.json").write_text(json.dumps(breakdown, indent=1))


def node_paths(graph) -> dict[str, str]:
    """{node name: its module's path as a torch scope, '/model/layers.0/self_attn/q_proj/…'} for a torch graph, whose
    node names ('node_linear_3') say nothing of where they belong: the exporter records the module path in each
    node's name-scope metadata. A builder graph's names are such paths already and are left out."""
    from edge_lora.export.graphs.portable import module_of

    return {n.name: "/" + module.replace(".", "/") + "/" + n.name for n in graph.node if (module := module_of(n))}


def region(node_name: str, op: str, head: set[str]) -> str:
    """Where a node belongs, from its scope path (the builder's node names, or node_paths for a torch graph)."""
    if node_name in head:
        return "output head"
    if "/self_attn/" in node_name:
        projection = op in ("MatMulNBits", "MatMul") and any(
            p in node_name for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
        return "attention projections" if projection else "attention core (RoPE, KV concat, scores, softmax)"
    if "/mlp/" in node_name:
        return "MLP projections" if op in ("MatMulNBits", "MatMul") else "MLP activation (SiLU, mul)"
    return "other (embedding, norms, residual adds)"


def trace_breakdown(trace: Path, model_path: Path, runs: int) -> dict:
    """Per decode token and for the prefill: session time, kernel time by region and by operator."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    head = {n.name for n in graph.node if "logits" in n.output}
    paths = node_paths(graph)
    levels = sorted(
        {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    )
    head_ops = sorted({n.op_type for n in graph.node if "logits" in n.output})
    events = json.loads(trace.read_text())
    model_runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )[-runs:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]

    def within(run):
        return [e for e in nodes if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]]

    def summary(run_list):
        n = len(run_list)
        by_region: dict[str, float] = {}
        by_op: dict[str, float] = {}
        kernel = 0.0
        for run in run_list:
            for e in within(run):
                name = e["name"].removesuffix("_kernel_time")
                r = region(paths.get(name, name), e["args"]["op_name"], head)
                by_region[r] = by_region.get(r, 0) + e["dur"] / 1e3 / n
                by_op[e["args"]["op_name"]] = by_op.get(e["args"]["op_name"], 0) + e["dur"] / 1e3 / n
                kernel += e["dur"] / 1e3 / n
        return {
            "session_run_ms": sum(r["dur"] for r in run_list) / 1e3 / n,
            "kernel_ms": kernel,
            "kernel_calls": sum(len(within(r)) for r in run_list) / n,
            "by_region_ms": dict(sorted(by_region.items(), key=lambda kv: -kv[1])),
            "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12]),
        }

    return {
        "trace": str(trace),
        "matmulnbits_accuracy_levels": levels,
        "head_ops": head_ops,
        "prefill": summary(model_runs[:1]),
        "decode_per_token": summary(model_runs[1:]),
    }


# ------------------------------------------------------------------------------------------------ reporting


def describe_machine() -> dict:
    import onnxruntime

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = Path("/proc/cpuinfo").read_text()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "avx512_vnni": "avx512_vnni" in flags,
        "amx": "amx_int8" in flags,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model instead of the reference shape")
    parser.add_argument("--workdir", default="/tmp/edge-lora-bench-runtime", help="where built artifacts are cached")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every system")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64, help="forced: end-of-sequence is ignored")
    parser.add_argument("--warmup", type=int, default=5, help="untimed generations per system")
    parser.add_argument("--runs", type=int, default=7, help="timed rounds (one generation per system each)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument(
        "--int4-block-size",
        type=int,
        default=64,
        choices=(16, 32, 64, 128),
        help="edge-lora's int4 block size (the CPU device profiles'; 4.5 bits a weight, as Q4_0)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also trace one edge-lora generation (onnxruntime profiler)"
    )
    parser.add_argument("--llama-cpp-src", help="a llama.cpp tree with convert_hf_to_gguf.py (default: from the sdist)")
    parser.add_argument("--build", help=argparse.SUPPRESS)  # internal: build one artifact in this process
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: serve one system in this process
    args = parser.parse_args()
    name_artifacts(args.int4_block_size)  # the children parse the same arguments, so they name the same dirs

    shape_name = "quick" if args.quick else "smollm2-135m"
    work = Path(args.workdir) / shape_name
    if args.build:
        return build_step(args.build, work, args)
    if args.child == "profile":
        return profile_child(work, args)
    if args.child:
        return serve_child(args.child, work, args)

    systems = args.systems.split(",")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)} — choose from {', '.join(SYSTEMS)}")
    if "llamacpp" in systems and importlib.util.find_spec("llama_cpp") is None:
        parser.error(
            "system llamacpp needs llama-cpp-python, which is not installed — run `make bench-deps` (it builds "
            "llama.cpp from source, about 8 min), or leave llamacpp out of --systems"
        )
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_all(work, systems)
    print(
        f"artifacts ready in {time.perf_counter() - t0:.1f} s under {work}; load {os.getloadavg()[0]:.2f}", flush=True
    )
    results, loads = measure(work, systems, args)
    raw = work / f"samples-{args.threads}threads.json"
    raw.write_text(json.dumps({"args": vars(args), "loads": loads, "results": results}, indent=1))
    print(f"raw samples: {raw}")
    bandwidth = read_bandwidth_gb_s(args.threads)

    model_mb, per_token = {}, {}
    for system in [s for s in systems if export_system(s) in EXPORT_ARTIFACTS]:
        export_dir = work / ARTIFACTS[export_system(system)]
        # the graph that system runs: a kernel's where the export has one (and the system is not _portable)
        manifest = ExportManifest.load(export_dir)
        kernel = {PORTABLE: None, LORA: LORA_ADD}.get(graph_variant(system), MATMUL_Q4)
        graph = manifest.graph_entry(kernel if kernel in manifest.kernels else None)
        model = graph.model_file
        adapters = [export_dir / e.file for e in graph.adapters.values()]
        # (the LoRA op's graph keeps its weights in the portable graph's data file: data_files)
        model_mb[system] = files_mb(*export_dir.glob(model + "*"), *(export_dir / f for f in graph.data_files))
        # an adapters graph's LoRA initializers are empty placeholders: the active adapter's A and B are read instead
        per_token[system] = onnx_bytes_per_token(export_dir / model) + sum(p.stat().st_size for p in adapters)
    if "llamacpp" in systems:
        model_mb["llamacpp"] = files_mb(work / ARTIFACTS["gguf"])
    if "genai" in systems:
        model_mb["genai"] = files_mb(*(work / ARTIFACTS["genai"]).glob("model.onnx*"))
        per_token["genai"] = onnx_bytes_per_token(work / ARTIFACTS["genai"] / "model.onnx")
    if "llamacpp" in systems:
        per_token["llamacpp"] = gguf_bytes_per_token(
            work / ARTIFACTS["gguf"], llama_cpp_sources(work, args.llama_cpp_src)
        )

    print(
        f"\n{'system':26} {'TTFT s':>8} {'decode tok/s':>12} {'whole tok/s':>11} {'peak RSS MB':>11} "
        f"{'model MB':>8} {'MB/token':>8} {'bound tok/s':>11} {'quiet runs':>10}"
    )
    for s, r in results.items():
        mb = per_token.get(s, 0) / 1e6
        print(
            f"{s:26} {r['ttft_s']:8.3f} {r['decode_tok_s']:12.1f} {r['whole_run_tok_s']:11.1f} "
            f"{r['peak_rss_mb']:11.0f} "
            f"{model_mb.get(s, 0):8.1f} {mb:8.1f} {bandwidth * 1e3 / mb if mb else 0:11.0f} "
            f"{r['uncontended_runs']:>4}/{r['runs']}"
        )
    print(
        f"read bandwidth ({args.threads} threads, numpy sum): {bandwidth:.1f} GB/s; "
        f"load average during rounds {min(loads):.2f}–{max(loads):.2f}"
    )

    edge, builder = results.get("edge_lora", {}), results.get("edge_lora_builder", {})

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    def over_model(system: str) -> float | None:
        return round(results[system]["peak_rss_mb"] - model_mb[system], 1) if system in results else None

    summary = {
        "shape": shape_name,
        "edge_lora_int4_block_size": args.int4_block_size,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        **{f"{s}_decode_tok_s": round(r["decode_tok_s"], 1) for s, r in results.items()},
        **{f"{s}_ttft_s": round(r["ttft_s"], 4) for s, r in results.items()},
        **{f"{s}_peak_rss_mb": round(r["peak_rss_mb"], 1) for s, r in results.items()},
        "vs_llamacpp_decode": ratio(edge.get("decode_tok_s"), results.get("llamacpp", {}).get("decode_tok_s")),
        "vs_genai_decode": ratio(edge.get("decode_tok_s"), results.get("genai", {}).get("decode_tok_s")),
        "vs_llamacpp_ttft": ratio(edge.get("ttft_s"), results.get("llamacpp", {}).get("ttft_s")),
        "vs_genai_ttft": ratio(edge.get("ttft_s"), results.get("genai", {}).get("ttft_s")),
        "builder_vs_torch_graph_decode": ratio(builder.get("decode_tok_s"), edge.get("decode_tok_s")),
        "builder_vs_torch_graph_ttft": ratio(builder.get("ttft_s"), edge.get("ttft_s")),
        "builder_vs_genai_decode": ratio(builder.get("decode_tok_s"), results.get("genai", {}).get("decode_tok_s")),
        "builder_vs_llamacpp_decode": ratio(
            builder.get("decode_tok_s"), results.get("llamacpp", {}).get("decode_tok_s")
        ),
        "builder_vs_genai_ttft": ratio(builder.get("ttft_s"), results.get("genai", {}).get("ttft_s")),
        "builder_vs_llamacpp_ttft": ratio(builder.get("ttft_s"), results.get("llamacpp", {}).get("ttft_s")),
        "builder_rss_over_model_mb": over_model("edge_lora_builder"),
        **(
            {"edge_lora_builder_model_mb": round(model_mb["edge_lora_builder"], 1)}
            if "edge_lora_builder" in model_mb
            else {}
        ),
        "adapter_vs_merged_decode": ratio(
            results.get("edge_lora_adapters", {}).get("decode_tok_s"), edge.get("decode_tok_s")
        ),
        "builder_adapter_vs_merged_decode": ratio(
            results.get("edge_lora_builder_adapters", {}).get("decode_tok_s"), builder.get("decode_tok_s")
        ),
        "builder_vs_portable_decode": ratio(
            builder.get("decode_tok_s"), results.get("edge_lora_builder_portable", {}).get("decode_tok_s")
        ),
        "builder_vs_portable_ttft": ratio(
            builder.get("ttft_s"), results.get("edge_lora_builder_portable", {}).get("ttft_s")
        ),
        "portable_builder_vs_genai_decode": ratio(
            results.get("edge_lora_builder_portable", {}).get("decode_tok_s"),
            results.get("genai", {}).get("decode_tok_s"),
        ),
        "portable_builder_adapter_vs_merged_decode": ratio(
            results.get("edge_lora_builder_adapters_portable", {}).get("decode_tok_s"),
            results.get("edge_lora_builder_portable", {}).get("decode_tok_s"),
        ),
        # without MatMulQ4: the LoRA op's graph with the adapter against the portable merged model
        "lora_op_adapter_vs_portable_merged_decode": ratio(
            results.get("edge_lora_builder_adapters_lora", {}).get("decode_tok_s"),
            results.get("edge_lora_builder_portable", {}).get("decode_tok_s"),
        ),
        "lora_op_adapter_vs_portable_merged_ttft": ratio(
            results.get("edge_lora_builder_adapters_lora", {}).get("ttft_s"),
            results.get("edge_lora_builder_portable", {}).get("ttft_s"),
        ),
        **({"edge_lora_model_mb": round(model_mb["edge_lora"], 1)} if "edge_lora" in model_mb else {}),
        "rss_over_model_mb": over_model("edge_lora"),
        **{f"{s}_mb_read_per_token": round(b / 1e6, 1) for s, b in per_token.items()},
        "read_bandwidth_gb_s": round(bandwidth, 1),
        **{f"{s}_bandwidth_bound_tok_s": round(bandwidth * 1e9 / b, 1) for s, b in per_token.items()},
        "vs_anchor_llamacpp_decode": ratio(
            results.get("llamacpp", {}).get("decode_tok_s"), ANCHOR["llamacpp_decode_tok_s"]
        ),
        "uncontended_runs": {s: f"{r['uncontended_runs']}/{r['runs']}" for s, r in results.items()},
        "loadavg_1min_min_max": [round(min(loads), 2), round(max(loads), 2)],
        "machine": describe_machine(),
        "quick": args.quick,
    }
    if args.profile:
        subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", "profile", "--workdir", str(work.parent)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        profile = json.loads((work / "profile.json").read_text())
        print_profile(profile)
        decode = profile["decode_per_token"]
        summary["profile_decode_ms_per_token"] = {
            "wall": round(profile["wall_ms_per_decode_token"], 3),
            "session_run": round(decode["session_run_ms"], 3),
            "kernels": round(decode["kernel_ms"], 3),
            **{k: round(v, 3) for k, v in decode["by_region_ms"].items()},
        }
        summary["profile_prefill_ms"] = {
            "session_run": round(profile["prefill"]["session_run_ms"], 2),
            **{k: round(v, 2) for k, v in profile["prefill"]["by_region_ms"].items()},
        }
    print(json.dumps(summary))


def print_profile(profile: dict) -> None:
    print(
        f"\nedge-lora profile (MatMulNBits accuracy_level {profile['matmulnbits_accuracy_levels']}, head op "
        f"{profile['head_ops']}); trace {profile['trace']}"
    )
    for phase in ("prefill", "decode_per_token"):
        p = profile[phase]
        print(
            f"  {phase}: session.run {p['session_run_ms']:.2f} ms, kernels {p['kernel_ms']:.2f} ms "
            f"({p['kernel_calls']:.0f} kernel calls)"
        )
        for k, v in p["by_region_ms"].items():
            print(f"    {k:52} {v:8.3f} ms")
        print("    by operator: " + ", ".join(f"{k} {v:.3f}" for k, v in p["by_op_ms"].items()))
    print(f"  wall per decode token {profile['wall_ms_per_decode_token']:.3f} ms (session.run + Python around it)")


if __name__ == "__main__":
    main()
