"""The runtime's generation on the conftest exports: sampling, stops, batches, chat, truncation, threads, bad input.

Greedy output against transformers' generate, family by family, is in test_families.py; the import rules in
test_import_rules.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edge_lora import runtime
from edge_lora.runtime.sampling import penalize_repetition, pick
from edge_lora.runtime.tokenizer import StopStrings, StreamDecoder, TextTokenizer

# A template made of characters the tiny character tokenizer has (no newline), with the BOS it adds itself.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
GREEDY = runtime.SamplingConfig(max_new_tokens=16)


@pytest.fixture(scope="module")
def generator(export_fp32) -> runtime.Generator:
    return runtime.load(export_fp32)


@pytest.fixture(scope="module")
def prompts(eval_samples) -> list[str]:
    # Trained prompts stop at </s> after about 11 tokens; "x" runs to max_new_tokens: rows that end apart.
    return [eval_samples[0]["prompt"], "x", eval_samples[1]["prompt"] + " ", eval_samples[2]["prompt"][:6]]


@pytest.fixture(scope="module")
def chat_export(export_fp32, tmp_path_factory):
    """export_fp32 with a chat template beside its tokenizer (a file export.json does not list: sha256 checks pass)."""
    path = shutil.copytree(export_fp32, tmp_path_factory.mktemp("chat") / "export")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def edge_lora(*args, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "edge_lora", *map(str, args)], capture_output=True, text=True, input=stdin, timeout=120
    )


def assert_one_line_error(done, *fragments):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- one generation -------------------------------------------------------------------------------------------


def test_generate_tokens_and_stream_agree(generator, prompts):
    generation = generator.generate(prompts[0], GREEDY)
    assert generation.finish_reason == "stop" and generation.token_ids[-1] in generator.eos_ids
    assert [token for token, _ in generator.tokens(prompts[0], GREEDY)] == generation.token_ids
    assert "".join(generator.stream(prompts[0], GREEDY)) == generation.text
    assert generation.text == generator.tokenizer.decode(generation.token_ids)
    assert len(generation.token_times_s) == len(generation.token_ids) - 1 and generation.ttft_s > 0
    forced = generator.generate(prompts[0], runtime.SamplingConfig(max_new_tokens=24, ignore_eos=True))
    assert len(forced.token_ids) == 24 and forced.finish_reason == "length"
    assert forced.token_ids[: len(generation.token_ids)] == generation.token_ids


def test_generation_steps_equal_single_passes(generator, prompts):
    """The cache handed from step to step gives what one pass over the whole sequence gives, token by token."""
    ids = generator.encode_prompt(prompts[0])
    generation = generator.generate(ids, GREEDY)
    for n, token in enumerate(generation.token_ids):
        assert int(np.argmax(generator.logits(ids + generation.token_ids[:n])[-1])) == token


# -- batches --------------------------------------------------------------------------------------------------


def test_batched_greedy_equals_one_by_one(generator, prompts):
    sampling = runtime.SamplingConfig(max_new_tokens=20)
    one_by_one = [generator.generate(p, sampling) for p in prompts]
    batched = generator.generate_batch(prompts, sampling)
    assert [g.token_ids for g in batched] == [g.token_ids for g in one_by_one]
    assert [g.text for g in batched] == [g.text for g in one_by_one]
    assert [g.finish_reason for g in batched] == [g.finish_reason for g in one_by_one]
    # the rows really ended apart, and the padded ones read only their own prompt
    assert {g.finish_reason for g in batched} == {"stop", "length"}
    assert len({g.prompt_tokens for g in batched}) > 1


def test_left_padded_logits_equal_unpadded(export_torch_fp32, prompts):
    generator = runtime.load(export_torch_fp32)  # torch's graph takes a left-padded batch with position ids
    short, long = generator.encode_prompt(prompts[1]), generator.encode_prompt(prompts[0])
    ids = np.array([[0] * (len(long) - len(short)) + short, long])
    mask = (np.arange(len(long)) >= len(long) - len(short)).astype(np.int64)[None].repeat(2, 0)
    mask[1] = 1
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    logits, _ = generator.forward(ids, generator._empty_cache(2), 0, mask, positions)
    # the same fp32 sums with masked (zero-weight) terms beside them: equal within fp32 rounding
    np.testing.assert_allclose(logits[0, -1], generator.logits(short)[-1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits[1, -1], generator.logits(long)[-1], rtol=0, atol=1e-5)


def test_an_export_of_optimums_graph_runs_as_torchs(export_torch_fp32, prompts, tmp_path):
    """export.json written before transformers 5 says graph "optimum": the same inputs and outputs, the same cache."""
    old = shutil.copytree(export_torch_fp32, tmp_path / "old")
    manifest = json.loads((old / "export.json").read_text())
    (old / "export.json").write_text(json.dumps(manifest | {"graph": "optimum"}))
    torch_graph, optimum_graph = runtime.load(export_torch_fp32), runtime.load(old)
    assert (torch_graph.graph, optimum_graph.graph) == ("torch", "optimum")
    ours, theirs = optimum_graph.generate_batch(prompts, GREEDY), torch_graph.generate_batch(prompts, GREEDY)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]


def test_batched_samples_are_each_rows_own(generator):
    sampling = runtime.SamplingConfig(max_new_tokens=12, temperature=1.5, seed=7)
    rows = generator.generate_batch(["x", "x", "x"], sampling)
    assert generator.generate_batch(["x", "x", "x"], sampling)[1].token_ids == rows[1].token_ids
    assert len({tuple(r.token_ids) for r in rows}) > 1  # one random stream per row, not one shared draw


def test_empty_batch_and_empty_prompt(generator):
    with pytest.raises(runtime.PromptError, match="no prompts were given"):
        generator.generate_batch([])
    with pytest.raises(runtime.PromptError, match="the prompt is empty"):
        generator.generate([])


# -- sampling -------------------------------------------------------------------------------------------------


def test_repetition_penalty_is_transformers(generator, prompts):
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 128).astype(np.float32)
    history = rng.integers(0, 128, 40)
    seen = np.zeros(128, dtype=bool)
    seen[history] = True
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(history[None]), torch.tensor(logits[None]))[0]
    np.testing.assert_array_equal(penalize_repetition(logits, seen, 1.3), expected.numpy())

    # in generation: over the prompt and every token so far, each step
    ids = generator.encode_prompt(prompts[0])
    ours = generator.generate(ids, runtime.SamplingConfig(max_new_tokens=10, repetition_penalty=1.3)).token_ids
    penalty, out = RepetitionPenaltyLogitsProcessor(1.3), []
    for _ in range(len(ours)):
        scores = penalty(torch.tensor([ids + out]), torch.tensor(generator.logits(ids + out)[-1:]))
        out.append(int(scores.argmax()))
    assert ours == out
    assert ours != generator.generate(ids, runtime.SamplingConfig(max_new_tokens=10)).token_ids


def test_pick_keeps_to_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04]))
    rng = np.random.default_rng(0)

    def draws(**options):
        sampling = runtime.SamplingConfig(temperature=1.0, **options)
        return {pick(logits, sampling, rng) for _ in range(300)}

    assert draws() == {0, 1, 2, 3, 4}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.85) == {0, 1, 2}  # 0.5 + 0.3 < 0.85: the third is needed to reach it
    assert draws(top_p=0.5) == {0}
    assert pick(logits, runtime.SamplingConfig(), rng) == 0


def test_seed_repeats_a_sample(generator):
    sampling = runtime.SamplingConfig(max_new_tokens=12, temperature=2.0, top_k=40, top_p=0.95, seed=3)
    first = generator.generate("x", sampling).token_ids
    assert generator.generate("x", sampling).token_ids == first
    others = {tuple(generator.generate("x", dataclasses.replace(sampling, seed=s)).token_ids) for s in range(4, 8)}
    assert others - {tuple(first)}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"repetition_penalty": 0}, r"repetition_penalty=0 must be > 0"),
        ({"stop": "\n"}, r"stop='\\n' must be a tuple of non-empty strings"),
        ({"stop": ("",)}, r"must be a tuple of non-empty strings"),
        ({"stop_token_ids": 2}, r"stop_token_ids=2 must be a tuple of token ids"),
        ({"truncate": "right"}, r"truncate='right' must be one of none, left"),
        ({"max_new_tokens": 0, "top_p": 0}, r"max_new_tokens=0 must be >= 1; top_p=0 must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_settings_are_named(options, message):
    with pytest.raises(runtime.PromptError, match=message):
        runtime.SamplingConfig(**options)


# -- stops ----------------------------------------------------------------------------------------------------


def test_stop_strings_hold_back_what_may_become_one():
    stops = StopStrings(["||", "xyz"])
    assert [stops.push(d) for d in ["ab", "c|", "x", "y!", "|"]] == ["ab", "c", "|", "xy!", ""]
    assert stops.flush() == "|" and stops.stopped is None
    assert [stops.push(d) for d in ["q|", "|tail", "more"]] == ["q", "", ""]
    assert stops.stopped == "||"
    first = StopStrings(["bc", "abcd"])
    assert first.push("xabcd") == "x" and first.stopped == "abcd"  # the one that starts first ends the text


def test_stop_string_ends_the_text_and_the_stream(generator, prompts):
    full = generator.generate(prompts[0], GREEDY)
    stop = full.text[3:5]  # ".0" of a date like " 21.03.1948"
    cut = full.text[: full.text.index(stop)]
    sampling = runtime.SamplingConfig(max_new_tokens=16, stop=(stop, "never"))
    stopped = generator.generate(prompts[0], sampling)
    assert stopped.text == cut and stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)] and len(stopped.token_ids) < len(
        full.token_ids
    )
    # a stream cannot take text back: had it shown the stop string's first character, the join would hold it
    assert "".join(generator.stream(prompts[0], sampling)) == cut
    # the start of a stop string that never completes is held, then let out when generation ends
    unfinished = full.text[-2:] + "~"
    assert (
        generator.generate(prompts[0], runtime.SamplingConfig(max_new_tokens=16, stop=(unfinished,))).text == full.text
    )
    assert (
        "".join(generator.stream(prompts[0], runtime.SamplingConfig(max_new_tokens=16, stop=(unfinished,))))
        == full.text
    )


def test_stop_token_ids_end_a_row(generator, prompts):
    full = generator.generate(prompts[0], GREEDY)
    token = full.token_ids[3]
    at = full.token_ids.index(token)
    stopped = generator.generate(prompts[0], runtime.SamplingConfig(max_new_tokens=16, stop_token_ids=(token,)))
    assert stopped.token_ids == full.token_ids[: at + 1] and stopped.finish_reason == "stop"
    assert stopped.text == generator.tokenizer.decode(full.token_ids[:at])  # its own text is not part of the reply


def test_generation_config_eos_ids_end_a_generation_too(export_fp32, prompts, tmp_path):
    """A chat model's end-of-turn token is often in generation_config.json only: transformers stops there."""
    export = shutil.copytree(export_fp32, tmp_path / "export")
    full = runtime.load(export).generate(prompts[0], GREEDY)
    config = json.loads((export / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], full.token_ids[2]]
    (export / "generation_config.json").write_text(json.dumps(config))
    generator = runtime.load(export, verify=False)
    assert generator.eos_ids == {2, full.token_ids[2]}
    stopped = generator.generate(prompts[0], GREEDY)
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(full.token_ids[2]) + 1]


def byte_level_tokenizer(tmp_path) -> TextTokenizer:
    """A byte-level BPE trained on ASCII only: every non-ASCII character is split into several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["hello world, the runtime streams text"] * 10,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    return TextTokenizer(tmp_path / "tokenizer.json")


def test_stream_never_splits_a_character(tmp_path):
    tokenizer = byte_level_tokenizer(tmp_path)
    text = "hello wörld — 日本語 🙂 streams"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode()) // 2  # many characters are more than one token
    decoder, stops = StreamDecoder(tokenizer), StopStrings(["本語 🙂 x"])
    deltas = [stops.push(decoder.push(i)) for i in ids]
    deltas.append(stops.push(decoder.flush()) + stops.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    # ending inside a character: the bytes come out as U+FFFD at the end, as in a decode of all the tokens
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    decoder = StreamDecoder(tokenizer)
    streamed = "".join(decoder.push(i) for i in ids[:cut])
    assert "\ufffd" not in streamed and streamed + decoder.flush() == tokenizer.decode(ids[:cut])


# -- context --------------------------------------------------------------------------------------------------


def test_a_long_prompt_is_refused_or_truncated(generator):
    prompt = "1999-12-31 ->" * 30  # 390 characters, one token each, and <s>
    with pytest.raises(
        runtime.PromptError,
        match=r"prompt of 391 tokens \+ max_new_tokens 8 exceeds the context of "
        r"256 tokens — shorten the prompt to 248 tokens, .* --truncate left",
    ):
        generator.generate(prompt, runtime.SamplingConfig(max_new_tokens=8))
    kept = generator.generate(prompt, runtime.SamplingConfig(max_new_tokens=8, truncate="left"))
    assert kept.prompt_tokens == 248
    assert (
        kept.token_ids
        == generator.generate(
            generator.encode_prompt(prompt)[-248:], runtime.SamplingConfig(max_new_tokens=8)
        ).token_ids
    )
    with pytest.raises(runtime.PromptError, match=r"max_new_tokens 256 leaves no room for a prompt in the context"):
        generator.generate("x", runtime.SamplingConfig(max_new_tokens=256, truncate="left"))


# -- chat -----------------------------------------------------------------------------------------------------


def test_chat_prompts_are_the_templates(chat_export, prompts):
    from transformers import AutoTokenizer

    generator = runtime.load(chat_export)
    messages = [{"role": "system", "content": "dates"}, {"role": "user", "content": prompts[0]}]
    tokenizer = AutoTokenizer.from_pretrained(chat_export)
    # the ids alone: transformers 5 returns a dict of ids and mask by default
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert generator.render_chat(messages) == expected
    assert generator.chat(messages, GREEDY).token_ids == generator.generate(expected, GREEDY).token_ids


def test_chat_on_the_command_line_keeps_the_history(chat_export):
    generator = runtime.load(chat_export)
    sampling = runtime.SamplingConfig(max_new_tokens=12)
    messages, replies = [{"role": "system", "content": "dates"}], []
    for line in ["2024-03-17 ->", "1999-12-31 ->"]:
        messages.append({"role": "user", "content": line})
        replies.append(generator.chat(messages, sampling).text)
        messages.append({"role": "assistant", "content": replies[-1]})
    done = edge_lora(
        "run",
        chat_export,
        "--chat",
        "--system",
        "dates",
        "--max-new-tokens",
        12,
        "--stream",
        stdin="2024-03-17 ->\n\n1999-12-31 ->\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == replies


def test_chat_without_a_template_is_refused(generator, export_fp32):
    with pytest.raises(runtime.ChatError, match=r"has no chat template .* pass a plain prompt"):
        generator.chat([{"role": "user", "content": "hi"}])
    assert_one_line_error(edge_lora("run", export_fp32, "--chat", stdin="hi\n"), "has no chat template")


# -- the command line and bad input ---------------------------------------------------------------------------


def test_run_with_stops_penalty_and_truncation(export_fp32, generator, prompts):
    sampling = runtime.SamplingConfig(max_new_tokens=8, repetition_penalty=1.2, stop=(".",), truncate="left")
    long = prompts[0] * 30
    done = edge_lora(
        "run",
        export_fp32,
        "--prompt",
        long,
        "--max-new-tokens",
        8,
        "--repetition-penalty",
        1.2,
        "--stop",
        ".",
        "--truncate",
        "left",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == generator.generate(long, sampling).text + "\n"
    assert_one_line_error(
        edge_lora("run", export_fp32, "--prompt", long, "--max-new-tokens", 8),
        "exceeds the context of 256 tokens",
        "--truncate left",
    )


def test_damaged_exports_are_named(export_fp32, tmp_path):
    broken = shutil.copytree(export_fp32, tmp_path / "broken")
    model = broken / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert_one_line_error(edge_lora("run", broken, "--prompt", "x"), "model.onnx sha256", "re-run edge-lora export")
    with pytest.raises(runtime.ExportError, match=r"model.onnx cannot be loaded by onnxruntime .* missing or corrupt"):
        runtime.load(broken, verify=False)
    shutil.copy2(export_fp32 / "model.onnx", model)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(runtime.ExportError, match=r"tokenizer.json cannot be read by tokenizers .* missing or corrupt"):
        runtime.load(broken, verify=False)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(runtime.ExportError, match=r"tokenizer.json is missing — re-run edge-lora export"):
        runtime.load(broken)


def test_providers_and_adapters_are_checked(export_fp32, generator):
    assert_one_line_error(
        edge_lora("run", export_fp32, "--prompt", "x", "--providers", "TurboExecutionProvider"),
        "execution provider 'TurboExecutionProvider' does not exist — available here:",
    )
    import onnxruntime as ort

    missing = next(p for p in ort.get_all_providers() if p not in ort.get_available_providers())
    with pytest.raises(runtime.ProviderError, match=rf"{missing} is not available in this onnxruntime build"):
        runtime.load(export_fp32, providers=[missing], strict_providers=True)
    with pytest.warns(UserWarning, match=f"{missing} is not available here; falling back"):
        assert runtime.load(export_fp32, providers=[missing]).session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(runtime.PromptError, match=r"unknown adapter 'dates' — known adapters: none"):
        generator.with_adapter("dates")


# -- sharing a generator --------------------------------------------------------------------------------------


def test_threads_share_one_generator(generator, prompts):
    samplings = [
        GREEDY,
        runtime.SamplingConfig(max_new_tokens=10, temperature=1.0, seed=1),
        runtime.SamplingConfig(max_new_tokens=12, stop=("0",)),
    ]
    jobs = [(p, s) for p in prompts for s in samplings] * 2
    expected = [generator.generate(p, s) for p, s in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: generator.generate(*job), jobs))
        streamed = list(pool.map(lambda job: "".join(generator.stream(*job)), jobs))
    assert [g.token_ids for g in together] == [g.token_ids for g in expected]
    assert streamed == [g.text for g in expected]


def test_generation_stays_torch_free(export_fp32):
    code = (
        "import sys\nfrom edge_lora import runtime\n"
        f"g = runtime.load({str(export_fp32)!r})\n"
        "s = runtime.SamplingConfig(max_new_tokens=8, repetition_penalty=1.2, stop=('.',), temperature=0.7, seed=0)\n"
        "g.generate_batch(['2024-03-17 ->', 'x'], s)\n"
        "''.join(g.stream('2024-03-17 ->', s))\n"
        "print(json.dumps([m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []
