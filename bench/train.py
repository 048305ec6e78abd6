"""Training benchmark: edge-lora's packed QLoRA loop against the transformers `Trainer` recipe.

    .venv/bin/python bench/train.py                 # the reference run (16.8M Llama, batch 8)
    .venv/bin/python bench/train.py --quick         # smoke run on a tiny model, about a minute

Both sides train the same random-weight Llama (NF4 base via bitsandbytes, PEFT LoRA r 16 / alpha 32 on every
linear layer, AdamW, cosine schedule, grad-norm clip 1.0, same seed) on the same token ids and labels, batch by
batch in the same order, for the same number of optimizer steps, in the same compute dtype (`--compute-dtype`;
default: what edge-lora picks on this machine — bfloat16 on a CPU with AVX512-BF16 or AMX, else float32 — and the
Trainer side then runs the same: bf16 4-bit compute, the model loaded in bf16, `TrainingArguments(bf16=True)`):

- edge-lora: `edge_lora.train.loop.train(TrainConfig(...))` as it is — samples packed into rows of at most
  `--pack-length` tokens, gradient checkpointing off (its default) unless `--edge-lora-checkpointing`.
- Trainer: the recipe users copy — `BitsAndBytesConfig` NF4 load, `prepare_model_for_kbit_training`,
  `get_peft_model`, `Trainer` with `activation_checkpointing=True` and `DataCollatorForSeq2Seq` padding to
  the longest sample of the batch. One change: its sampler reads the data in edge-lora's batch order, so that
  both sides see the same batch at every step (the sampler does not affect speed).

Each side runs in its own process, so that its peak RSS (`ru_maxrss`) is its own. The two processes take
turns, one optimizer step each (Trainer step 1, edge-lora step 1, Trainer step 2, ...), passing a token
through a pipe: on a shared machine whose load comes and goes, the two steps of a pair run under the same load,
and the speedup is the median over steps of the paired time ratio (same batch, so same useful tokens).
A step's clock starts when its process gets the turn and stops at the end of the optimizer step (edge-lora:
the progress callback after its metrics row; Trainer: `on_step_end`); it covers batch building, forward,
backward, optimizer and the previous step's logging. The first `--warmup` steps are not timed. Useful tokens
are the loss-bearing ones (label != -100), counted from the batches each side actually built. The headline
figures use only the pairs in which both processes had their cores (see `uncontended`) when there are at
least MIN_UNCONTENDED of them, and all pairs otherwise; `speedup_basis` says which.

The last line printed is one JSON object with the figures and their ratios against the anchor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

# The anchor: the Trainer recipe's reference run on 2 CPU cores, batch 8, lengths uniform in 16–256.
ANCHOR_TRAINER_TOK_S = 338.0
ANCHOR_TRAINER_PADDING = 0.43
ANCHOR_TRAINER_RSS_MB = 1087.0

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB_SIZE = 4096
# 16,785,920 parameters: tied embeddings 4096 × 512 (2.10M) + 8 × (attention 4 × 512² + MLP 3 × 512 × 512
# + two norms) + the final norm. Tying the head is what makes hidden 512, 8 layers, vocab 4096 come to 16.8M
# with a whole intermediate size; untied, the head alone would add 2.1M.
FULL_MODEL = dict(
    hidden_size=512,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    tie_word_embeddings=True,
)
QUICK_MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    tie_word_embeddings=True,
)
MIN_TOKENS, MAX_TOKENS = 16, 256  # per sample, <s> and </s> included
PROMPT_WORDS = (4, 12)
SUCCESSORS = 8  # the data is a random Markov chain with this many next words per word: a learnable loss floor
LORA = dict(r=16, alpha=32.0, dropout=0.0)
IGNORE_INDEX = -100
MIN_UNCONTENDED = 10  # headline figures use only uncontended step pairs when there are at least this many
SIDES = ("trainer", "edge-lora")  # in turn order: the Trainer takes each step first


# --------------------------------------------------------------------------------------------- preparation


def word_tokenizer():
    """A `PreTrainedTokenizerFast` over 4096 ids: four specials, then "w0".."w4091", one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS))]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )


def build_model(out_dir: Path, shape: dict, seed: int) -> int:
    """Save a random-weight Llama and the word tokenizer; returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_TOKENS,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **shape,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    word_tokenizer().save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def write_data(path: Path, n_samples: int, seed: int) -> None:
    """JSONL prompt/completion records of words drawn from a random Markov chain; total length (with <s> and
    </s>) uniform in MIN_TOKENS..MAX_TOKENS, a short prompt, the rest completion (the loss-bearing part)."""
    rng = random.Random(seed)
    n_words = VOCAB_SIZE - len(SPECIAL_TOKENS)
    successors = [rng.sample(range(n_words), SUCCESSORS) for _ in range(n_words)]
    with open(path, "w") as f:
        for _ in range(n_samples):
            total = rng.randint(MIN_TOKENS, MAX_TOKENS)
            n_prompt = rng.randint(*PROMPT_WORDS)
            word = rng.randrange(n_words)
            chain = []
            for _ in range(total - 2):
                chain.append(f"w{word}")
                word = rng.choice(successors[word])
            f.write(json.dumps({"prompt": " ".join(chain[:n_prompt]), "completion": " ".join(chain[n_prompt:])}) + "\n")


# ------------------------------------------------------------------------------------------- measurements


class TurnClock:
    """Takes turns with the other side's process, one optimizer step each, and times this side's steps.

    `start()` before the first step blocks until this side has the turn; `step_end()` after every optimizer
    step records the step's wall and CPU seconds, hands the turn over and blocks until it comes back.
    """

    def __init__(self, wait_fd: int, pass_fd: int, max_steps: int):
        self.wait_fd, self.pass_fd, self.max_steps = wait_fd, pass_fd, max_steps
        self.steps: list[tuple[float, float]] = []  # (wall, CPU) seconds of each step
        self.resumed: tuple[float, float] | None = None

    def start(self) -> None:
        if self.resumed is None:
            self._wait()

    def step_end(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.steps.append((wall - self.resumed[0], cpu - self.resumed[1]))
        last = len(self.steps) == self.max_steps
        try:
            os.write(self.pass_fd, b"t")
        except BrokenPipeError:  # the other side has finished its last step and exited
            if not last:
                raise SystemExit("the other side stopped before the end — see its error above") from None
        if not last:
            self._wait()

    def _wait(self) -> None:
        if not os.read(self.wait_fd, 1):
            raise SystemExit("the other side stopped before the end — see its error above")
        self.resumed = (time.perf_counter(), time.process_time())


def sample_digest(input_ids, labels) -> str:
    return hashlib.sha256(json.dumps([list(map(int, input_ids)), list(map(int, labels))]).encode()).hexdigest()


def batch_digest(samples: list[tuple]) -> str:
    """Order-free digest of one batch's (input_ids, labels) pairs: packing reorders samples, padding does not."""
    return hashlib.sha256("".join(sorted(sample_digest(ids, labels) for ids, labels in samples)).encode()).hexdigest()[
        :16
    ]


def batch_record(samples: list[tuple], batch: dict, padding: int) -> dict:
    return {
        "digest": batch_digest(samples),
        "useful": int((batch["labels"] != IGNORE_INDEX).sum()),
        "tokens": batch["input_ids"].numel(),
        "padding": padding,
        "shape": list(batch["input_ids"].shape),
    }


def lora_digest(model) -> str:
    """Digest of the initial LoRA weights, to show both sides start from the same adapter."""
    import torch

    digest = hashlib.sha256()
    for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if p.requires_grad:
            digest.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------------------- sides


def run_edge_lora(work: Path, args, clock: TurnClock) -> dict:
    """edge-lora's trainer as shipped; `pack`, `add_lora` and `progress_bar` are wrapped only to observe it."""
    import torch

    # (not `import edge_lora.train.loop as ...`: the attribute edge_lora.train is the train() function)
    from edge_lora.train import loop as trainer
    from edge_lora.train.config import LoraConfig, QuantConfig, TrainConfig

    torch.set_num_threads(args.threads)
    batches, seen = [], {}
    original_pack, original_add_lora, original_progress_bar = trainer.pack, trainer.add_lora, trainer.progress_bar

    def observed_pack(examples, pack_length, pad_id):
        clock.start()  # the first call comes right before the first step
        batch = original_pack(examples, pack_length, pad_id)
        padding = batch["input_ids"].numel() - sum(len(e.input_ids) for e in examples)
        batches.append(batch_record([(e.input_ids, e.labels) for e in examples], batch, padding))
        return batch

    def observed_add_lora(*a, **kw):
        model = original_add_lora(*a, **kw)
        seen["lora_init"] = lora_digest(model)
        return model

    @contextmanager
    def clocked_progress_bar(description, *a, **kw):
        # The loop calls advance(1, ...) once after every optimizer step, after its metrics row (and
        # advance(0, ...) once before the first step, which is not a step).
        with original_progress_bar(description, *a, **kw) as advance:

            def clocked(n: int = 1, status: str = "") -> None:
                advance(n, status)
                if description == "training" and n:
                    clock.step_end()

            yield clocked

    trainer.pack, trainer.add_lora, trainer.progress_bar = observed_pack, observed_add_lora, clocked_progress_bar
    extra = {"gradient_checkpointing": True} if args.edge_lora_checkpointing else {}
    config = TrainConfig(
        model=str(work / "model"),
        data=str(work / "data.jsonl"),
        output=str(work / "edge-lora-adapter"),
        max_steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        max_length=MAX_TOKENS,
        pack_length=args.pack_length,
        learning_rate=args.lr,
        warmup_steps=0,
        schedule="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=args.seed,
        log_every=1,
        lora=LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules=("all-linear",)),
        quant=QuantConfig(compute_dtype=resolved_dtype(args)),
        **extra,
    )
    shutil.rmtree(config.output, ignore_errors=True)  # the trainer refuses to overwrite an earlier run
    trainer.train(config, show_progress=False)
    rows = [json.loads(line) for line in (work / "edge-lora-adapter" / "metrics.jsonl").read_text().splitlines()]
    counts = (len(rows), len(batches), len(clock.steps))
    if counts != (config.max_steps,) * 3:
        raise SystemExit(
            f"edge-lora side: expected one metrics row, packed batch and progress step per optimizer step "
            f"({config.max_steps}), got {counts} — the trainer's loop changed; adapt the bench"
        )
    return {"losses": [r["loss"] for r in rows], "batches": batches, "lora_init": seen["lora_init"]}


def run_trainer(work: Path, args, clock: TurnClock) -> dict:
    """The standard transformers Trainer + PEFT + bitsandbytes NF4 recipe, padded batches, checkpointing on."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from edge_lora.train.data import batch_order

    quiet_logs()
    torch.set_num_threads(args.threads)
    model_dir = work / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def tokenize(record: dict) -> dict:
        prompt = tokenizer(record["prompt"])["input_ids"]  # <s> + prompt
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + completion)[:MAX_TOKENS]
        return {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "labels": ([IGNORE_INDEX] * len(prompt) + completion)[:MAX_TOKENS],
        }

    records = [tokenize(json.loads(line)) for line in (work / "data.jsonl").read_text().splitlines()]
    max_steps = args.warmup + args.steps
    # edge-lora's batch order, read sequentially: the same samples in every step on both sides.
    dataset = [
        records[i] for step in range(max_steps) for i in batch_order(len(records), args.batch_size, step, args.seed)
    ]

    set_seed(args.seed)
    dtype = getattr(torch, resolved_dtype(args))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        ),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    lora_init = lora_digest(model)

    batches = []
    pad_collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)

    def counting_collator(features):
        clock.start()  # the first batch is collated right before the first step
        batch = pad_collator(features)
        padding = int((batch["attention_mask"] == 0).sum())
        batches.append(batch_record([(f["input_ids"], f["labels"]) for f in features], batch, padding))
        return batch

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    training_args = TrainingArguments(
        output_dir=str(work / "trainer-out"),
        per_device_train_batch_size=args.batch_size,
        activation_checkpointing=True,
        max_steps=max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=args.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        bf16=dtype == torch.bfloat16,
    )
    trainer = InOrderTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=counting_collator, callbacks=[StepEnd()]
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    if (len(losses), len(batches), len(clock.steps)) != (max_steps,) * 3:
        raise SystemExit(
            f"Trainer side: expected {max_steps} losses, batches and steps, "
            f"got {len(losses)}, {len(batches)}, {len(clock.steps)}"
        )
    return {"losses": losses, "batches": batches, "lora_init": lora_init}


def resolved_dtype(args) -> str:
    """--compute-dtype with auto resolved as edge-lora resolves it here: "float32" or "bfloat16"."""
    if args.compute_dtype != "auto":
        return args.compute_dtype
    from edge_lora.train.config import QuantConfig
    from edge_lora.train.qlora import compute_dtype

    return str(compute_dtype(QuantConfig())).removeprefix("torch.")


def quiet_logs() -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)


def run_side(side: str, work: Path, args) -> None:
    """Entry point of a side's process: trains in turns with the other side, writes work/<side>.json."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wait_fd, pass_fd = map(int, args.turn_fds.split(","))
    clock = TurnClock(wait_fd, pass_fd, args.warmup + args.steps)
    result = run_edge_lora(work, args, clock) if side == "edge-lora" else run_trainer(work, args, clock)
    result.update(
        {
            "side": side,
            "step_seconds": [round(wall, 4) for wall, _ in clock.steps],
            "step_cpu_seconds": [round(cpu, 4) for _, cpu in clock.steps],
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    )
    (work / f"{side}.json").write_text(json.dumps(result))


def run_both(work: Path, args) -> tuple[dict, dict]:
    """Start both sides, give the Trainer the first turn, wait for both; returns (edge-lora, Trainer) results."""
    to_hf, to_edge = os.pipe(), os.pipe()  # (read, write) each
    fds = {"trainer": (to_hf[0], to_edge[1]), "edge-lora": (to_edge[0], to_hf[1])}
    procs = {}
    for side in SIDES:
        wait_fd, pass_fd = fds[side]
        procs[side] = subprocess.Popen(
            [
                sys.executable,
                __file__,
                *sys.argv[1:],
                "--side",
                side,
                "--workdir",
                str(work),
                "--turn-fds",
                f"{wait_fd},{pass_fd}",
            ],
            pass_fds=(wait_fd, pass_fd),
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
    os.write(to_hf[1], b"t")
    # Only the sides hold the pipes now: when one dies, the other reads end-of-file instead of waiting forever.
    for fd in (*to_hf, *to_edge):
        os.close(fd)
    loads, failed = [], None
    while any(p.poll() is None for p in procs.values()):
        loads.append(os.getloadavg()[0])
        for side, p in procs.items():
            if p.poll() not in (None, 0):
                failed = failed or f"{side} side exited with status {p.returncode}"
        time.sleep(5)
    failed = failed or next(
        (f"{s} side exited with status {p.returncode}" for s, p in procs.items() if p.returncode), None
    )
    if failed:
        raise SystemExit(failed)
    args.loads = loads
    return (json.loads((work / "edge-lora.json").read_text()), json.loads((work / "trainer.json").read_text()))


# ---------------------------------------------------------------------------------------------- the report


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def stdev(xs: list[float]) -> float:
    m = mean(xs)
    return (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    at = q * (len(xs) - 1)
    lo = int(at)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (at - lo)


def timed(side: dict, key: str, warmup: int) -> list:
    return side[key][warmup:]


def uncontended(side: dict, warmup: int, threads: int) -> list[bool]:
    """Per timed step: did the process keep all its threads busy (CPU seconds ≈ threads × wall seconds)?

    When other work takes the cores, a process gets about one CPU and its OpenMP threads spend it waiting for
    each other at every parallel op: steps run up to 10× slower and the ratio between the sides shrinks
    towards the ratio of their op counts. Such steps say more about the neighbours than about the code.
    """
    walls, cpus = timed(side, "step_seconds", warmup), timed(side, "step_cpu_seconds", warmup)
    return [cpu >= 0.9 * threads * wall for wall, cpu in zip(walls, cpus)]


def batch_total(side: dict, key: str) -> int:
    return sum(b[key] for b in side["batches"])


def compare(edge: dict, hf: dict, args, n_params: int) -> dict:
    if [b["digest"] for b in edge["batches"]] != [b["digest"] for b in hf["batches"]]:
        raise SystemExit(
            "the two sides did not train on the same token ids and labels, step by step — "
            "the benchmark is not comparing like with like"
        )
    w = args.warmup
    useful = [b["useful"] for b in timed(edge, "batches", w)]
    if useful != [b["useful"] for b in timed(hf, "batches", w)]:
        raise SystemExit("the two sides counted different useful tokens for the same batches")
    edge_s, hf_s = timed(edge, "step_seconds", w), timed(hf, "step_seconds", w)
    quiet = [
        k
        for k, (a, b) in enumerate(zip(uncontended(edge, w, args.threads), uncontended(hf, w, args.threads)))
        if a and b
    ]
    basis = quiet if len(quiet) >= MIN_UNCONTENDED else list(range(len(useful)))
    # Each pair of steps ran back to back on the same batch: its time ratio is that step's speedup.
    ratios = [hf_s[k] / edge_s[k] for k in basis]
    edge_rates, hf_rates = [useful[k] / edge_s[k] for k in basis], [useful[k] / hf_s[k] for k in basis]
    all_ratios = [h / e for e, h in zip(edge_s, hf_s)]
    edge_mean, hf_mean = sum(useful) / sum(edge_s), sum(useful) / sum(hf_s)
    edge_cpu = sum(useful) / sum(timed(edge, "step_cpu_seconds", w))
    hf_cpu = sum(useful) / sum(timed(hf, "step_cpu_seconds", w))
    tail = min(10, len(edge["losses"]))
    edge_tail, hf_tail = edge["losses"][-tail:], hf["losses"][-tail:]
    # Same batches in the same order, so the curves are compared step by step. "Within noise": the mean gap over
    # the last `tail` steps is smaller than twice the standard error of the Trainer's own last-`tail` mean
    # (its batch-to-batch spread over √tail).
    gap = mean(edge_tail) - mean(hf_tail)
    noise = 2 * stdev(hf_tail) / tail**0.5
    step_gaps = [abs(a - b) / b for a, b in zip(edge["losses"], hf["losses"])]
    return {
        "edge_lora_useful_tok_s": round(quantile(edge_rates, 0.5), 1),
        "trainer_useful_tok_s": round(quantile(hf_rates, 0.5), 1),
        "speedup": round(quantile(ratios, 0.5), 3),
        "speedup_p25_p75": [round(quantile(ratios, 0.25), 3), round(quantile(ratios, 0.75), 3)],
        "speedup_basis": f"{'uncontended' if basis is quiet else 'all'} step pairs: {len(basis)} of {len(useful)}",
        "speedup_all_pairs": round(quantile(all_ratios, 0.5), 3),
        "edge_lora_peak_rss_mb": edge["peak_rss_mb"],
        "trainer_peak_rss_mb": hf["peak_rss_mb"],
        "rss_ratio": round(edge["peak_rss_mb"] / hf["peak_rss_mb"], 3),
        "trainer_padding_fraction": round(batch_total(hf, "padding") / batch_total(hf, "tokens"), 3),
        "edge_lora_padding_fraction": round(batch_total(edge, "padding") / batch_total(edge, "tokens"), 3),
        "edge_lora_final_loss": round(mean(edge_tail), 4),
        "trainer_final_loss": round(mean(hf_tail), 4),
        "final_loss_rel_diff": round(gap / mean(hf_tail), 5),
        "loss_within_noise": abs(gap) <= noise,
        "max_step_loss_rel_diff": round(max(step_gaps), 5),
        "same_lora_init": edge["lora_init"] == hf["lora_init"],
        # Whole-window means: what a user waits, but at the mercy of whatever else ran on the machine.
        "edge_lora_mean_tok_s": round(edge_mean, 1),
        "trainer_mean_tok_s": round(hf_mean, 1),
        "speedup_of_means": round(edge_mean / hf_mean, 3),
        "edge_lora_useful_tok_per_cpu_s": round(edge_cpu, 1),
        "trainer_useful_tok_per_cpu_s": round(hf_cpu, 1),
        "vs_anchor_trainer_tok_s": round(quantile(hf_rates, 0.5) / ANCHOR_TRAINER_TOK_S, 3),
        "vs_anchor_trainer_rss": round(hf["peak_rss_mb"] / ANCHOR_TRAINER_RSS_MB, 3),
        "steps": args.steps,
        "warmup_steps": w,
        "batch_size": args.batch_size,
        "pack_length": args.pack_length,
        "edge_lora_checkpointing": args.edge_lora_checkpointing,
        "lr": args.lr,
        "params": n_params,
        "threads": args.threads,
        "loadavg_1min_min_median_max": [round(quantile(args.loads, q), 2) for q in (0, 0.5, 1)] if args.loads else None,
        "quick": args.quick,
        "compute_dtype": resolved_dtype(args),
    }


def print_report(edge: dict, hf: dict, result: dict, warmup: int) -> None:
    print(f"{'':32}{'edge-lora':>12}{'Trainer':>12}")
    useful = sum(b["useful"] for b in edge["batches"][warmup:])
    rows = (
        ("useful tokens/s (median step)", result["edge_lora_useful_tok_s"], result["trainer_useful_tok_s"]),
        ("useful tokens/s (whole window)", result["edge_lora_mean_tok_s"], result["trainer_mean_tok_s"]),
        (
            "useful tokens per CPU-second",
            result["edge_lora_useful_tok_per_cpu_s"],
            result["trainer_useful_tok_per_cpu_s"],
        ),
        ("useful tokens (timed steps)", useful, useful),
        ("batch tokens incl. padding", *(sum(b["tokens"] for b in s["batches"][warmup:]) for s in (edge, hf))),
        ("padding fraction", result["edge_lora_padding_fraction"], result["trainer_padding_fraction"]),
        ("peak RSS MB", edge["peak_rss_mb"], hf["peak_rss_mb"]),
    )
    for label, a, b in rows:
        print(f"{label:32}{a:>12}{b:>12}")
    print(
        "batch shapes (first 3)        ",
        f"edge-lora {[b['shape'] for b in edge['batches'][:3]]}, Trainer {[b['shape'] for b in hf['batches'][:3]]}",
    )
    for name, side in (("edge-lora", edge), ("Trainer", hf)):
        print(f"step seconds ({name}) ".ljust(28), " ".join(f"{x:.2f}" for x in side["step_seconds"]))
    for name, side in (("edge-lora", edge), ("Trainer", hf)):
        print(f"loss per step ({name}) ".ljust(28), " ".join(f"{x:.3f}" for x in side["losses"]))
    print(
        f"speedup {result['speedup']}x (median over {result['speedup_basis']}, IQR {result['speedup_p25_p75']}; "
        f"all pairs {result['speedup_all_pairs']}x; whole-window means {result['speedup_of_means']}x), "
        f"peak RSS ratio {result['rss_ratio']}, Trainer padding "
        f"{result['trainer_padding_fraction']:.0%} (anchor: {ANCHOR_TRAINER_PADDING:.0%}), last-10 loss "
        f"{result['edge_lora_final_loss']} vs {result['trainer_final_loss']} "
        f"({'within' if result['loss_within_noise'] else 'outside'} noise)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: .venv/bin/python bench/train.py --steps 30",
    )
    parser.add_argument("--steps", type=int, help="timed optimizer steps per side (default 30; 6 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps before them (default 5; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step (default 8)")
    parser.add_argument(
        "--pack-length",
        type=int,
        default=MAX_TOKENS,
        help=f"edge-lora's packed row length (default {MAX_TOKENS}, the longest sample)",
    )
    parser.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate, both sides (default 2e-4)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compute-dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="compute dtype of both sides (default auto: edge-lora's choice on this machine)",
    )
    parser.add_argument(
        "--edge-lora-checkpointing",
        action="store_true",
        help="turn on edge-lora's gradient checkpointing too (the Trainer side always has it on)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 + 6 steps: a smoke run")
    parser.add_argument("--workdir", help="keep the model, data and per-side JSON here instead of a temp dir")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--turn-fds", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 6 if args.quick else 30
    if args.warmup is None:
        args.warmup = 2 if args.quick else 5
    if min(args.steps, args.warmup) < 1:
        parser.error(f"--steps {args.steps} and --warmup {args.warmup} must both be at least 1")

    if args.side:
        run_side(args.side, Path(args.workdir), args)
        return

    with tempfile.TemporaryDirectory(prefix="edge-lora-bench-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        n_params = build_model(work / "model", QUICK_MODEL if args.quick else FULL_MODEL, args.seed)
        # Exactly one epoch: every step draws a fresh batch of samples on both sides.
        write_data(work / "data.jsonl", (args.warmup + args.steps) * args.batch_size, args.seed)
        print(
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"load {os.getloadavg()[0]:.2f}; model {n_params:,} parameters; {args.warmup} untimed + "
            f"{args.steps} timed steps of batch {args.batch_size} in {resolved_dtype(args)}, "
            "the two sides taking turns",
            flush=True,
        )
        edge, hf = run_both(work, args)
        result = compare(edge, hf, args, n_params)
        print_report(edge, hf, result, args.warmup)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
