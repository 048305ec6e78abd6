"""The `edge-lora` command: a thin click layer over the stage functions.

Each command imports its stage's heavy dependencies inside its body, so that `edge-lora run` on a device
needs only the runtime's.
"""

from __future__ import annotations

import json
import os
import sys

import click

from edge_lora.errors import UsageError
from edge_lora.formats import ADAPTER_MANIFEST, FLAVORS, GRAPHS, PRECISIONS

EXIT_BAD_INPUT = 2


def csv_ints(value: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{name} {value!r} is not a comma-separated list of integers — for example 1,2,4") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"{name} {value!r} needs one or more integers >= 0 — for example 1,2,4")
    return values


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edge-lora")
def cli():
    """edge-lora: QLoRA fine-tune a Hugging Face causal LM, export it to ONNX with proven parity, and run it
    torch-free on an edge device.

    \b
    Start with:  edge-lora demo --workdir demo-out
    """


@cli.command()
@click.option("--workdir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo writes its model, data, adapter, exports and summary.json.")
def demo(workdir):
    """Run the whole job offline on a tiny model: build a random-weight Llama, QLoRA-train it on a
    date-reformatting task, export ONNX fp32 and int4, run both on the torch-free runtime, print one table.

    \b
    Example:  edge-lora demo --workdir demo-out
    """
    from edge_lora.demo.run import run_demo

    run_demo(workdir)


@cli.command()
@click.option("--model", default=None, help="Base model: a local Hugging Face dir or a hub id.")
@click.option("--data", default=None, help="Training JSONL: prompt/completion, messages or text records.")
@click.option("--eval-data", default=None, help="Held-out JSONL of the same shape.")
@click.option("--eval-fraction", type=float, default=None, help="Without --eval-data: hold out this fraction of --data.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="TOML file of TrainConfig fields (see examples/); the options here override it.")
@click.option("--output", default=None, help="Adapter dir to write [default: adapter].")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps [default: 600].")
@click.option("--batch-size", type=int, default=None, help="Samples per optimizer step [default: 32].")
@click.option("--grad-accum", "grad_accum_steps", type=int, default=None, help="Micro-batches per step [default: 1].")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Recompute activations: less memory.")
@click.option("--lr", "learning_rate", type=float, default=None, help="Peak learning rate [default: 2e-4].")
@click.option("--rank", type=int, default=None, help="LoRA rank r [default: 16].")
@click.option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
              help="Dtype of the matmuls [default: auto: bfloat16 on a GPU or CPU that has it, else float32].")
@click.option("--max-length", type=int, default=None, help="Truncate samples to this many tokens [default: 512].")
@click.option("--seed", type=int, default=None, help="Seed [default: 0].")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps [default: only at the end].")
@click.option("--train-on-prompt", is_flag=True, default=None, help="Take the loss on prompt tokens too.")
@click.option("--allow-overlap", is_flag=True, default=None,
              help="Train even when eval samples duplicate training samples (the data card records it).")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(config_file, rank, compute_dtype, resume, quiet, **options):
    """QLoRA: train LoRA adapters on a frozen 4-bit NF4 base; write a PEFT adapter dir with edge_lora.json,
    metrics.jsonl, loss.png and checkpoints/.

    \b
    Example:  edge-lora train --model demo-out/base --data demo-out/data/train.jsonl --output my-adapter --max-steps 300 --lr 2e-3
              edge-lora train --config examples/date-reformat.toml
    """
    from edge_lora.train.config import TrainConfig, load_toml

    given = {k: v for k, v in options.items() if v is not None}
    if config_file:
        config = load_toml(config_file, given)
    else:
        missing = [f"--{k}" for k in ("model", "data") if k not in given]
        if missing:
            raise UsageError(f"missing {' and '.join(missing)} — pass them, or a --config file that sets them")
        config = TrainConfig(**given)
    if rank is not None:
        config = config.with_overrides(lora={"r": rank})
    if compute_dtype is not None:
        config = config.with_overrides(quant={"compute_dtype": compute_dtype})

    from edge_lora.train.loop import train as run_training

    out = run_training(config, show_progress=not quiet, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from the main process is enough
        metrics = json.loads((out / ADAPTER_MANIFEST).read_text())["metrics"]
        click.echo(f"adapter written to {out}: final loss {metrics['train_loss']:.4f}, {metrics['seconds_per_step']:.3f} s/step")


@cli.command()
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--output", required=True, help="Export dir to write (built in a temporary dir, then renamed).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Weight precision [default: fp32, or the device profile's].")
@click.option("--flavor", type=click.Choice(FLAVORS), default=None,
              help="Merge one adapter into the base, or keep several apart beside one base graph [default: merged].")
@click.option("--merge-into", type=click.Choice(["dequantized", "original"]), default="dequantized", show_default=True,
              help="Merge onto the dequantized 4-bit weights the adapter was trained against, or the original ones.")
@click.option("--device", default=None, help="Device profile (see 'edge-lora devices list') for precision and opset.")
@click.option("--int4-block-size", type=click.Choice(["16", "32", "64", "128"]), default=None,
              help="Weights per int4 scale [default: 32, or the device profile's].")
@click.option("--int4-accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits accuracy_level: 4 = int8 activations [default: 4, or the device profile's].")
@click.option("--int4-head/--no-int4-head", default=True, show_default=True,
              help="Quantize the output head (and a tied embedding's MatMul) to int4 too.")
@click.option("--graph", type=click.Choice(GRAPHS), default=None,
              help="Graph writer: optimum's exporter, onnxruntime-genai's model builder (fused attention, "
                   "Llama-family, fp32 or int4), or auto (the builder where it applies). Default: the "
                   "--device profile's, else auto.")
@click.option("--base", default=None, help="Base model dir, if not where the adapter's manifest says.")
@click.option("--force", is_flag=True, help="Export even if --base's fingerprint differs from the adapter's base.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output once the new export is complete.")
@click.option("--no-validate", is_flag=True, help="Skip the parity gate (not recommended).")
@click.option("--no-kernels", is_flag=True,
              help="Write the portable graph alone, without the graphs for edge-lora's own kernels (the profile's: "
                   "matmul_q4, lora_add).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(adapter_dirs, output, precision, flavor, merge_into, device, int4_block_size, int4_accuracy_level, int4_head,
           graph, base, force, overwrite, no_validate, no_kernels, quiet):
    """Merge an adapter (or keep several apart), export ONNX with KV cache, quantize, and check parity with
    the trained model.

    \b
    Example:  edge-lora export my-adapter --output my-export --precision int4
              edge-lora export adapter-a adapter-b --flavor adapters --output shared-export
              edge-lora export my-adapter --output laptop-export --device cpu-x86-64
    """
    from edge_lora import devices

    options = {"merge_into": merge_into, "validate": not no_validate, "int4_head": int4_head}
    if no_kernels:
        options["kernels"] = ()
    if device:
        profile = devices.load(device)
        options |= {"precision": profile.precision, "flavor": profile.flavor, "opset": profile.opset,
                    "graph": profile.graph, "device": profile.name, "int4_block_size": profile.int4_block_size,
                    "int4_accuracy_level": profile.int4_accuracy_level}
    given = {"precision": precision, "flavor": flavor, "int4_accuracy_level": int4_accuracy_level, "graph": graph,
             "int4_block_size": int(int4_block_size) if int4_block_size else None}
    options |= {k: v for k, v in given.items() if v is not None}

    from edge_lora.export import ExportOptions, export as run_export

    out = run_export(list(adapter_dirs), output, ExportOptions(**options), base=base, force=force,
                     overwrite=overwrite, show_progress=not quiet)
    manifest = json.loads((out / "export.json").read_text())
    parity = manifest.get("parity")
    verdict = "; ".join(
        f"{name}: max |Δlogit| {p['max_abs_logit_diff']:.2e}, greedy agreement {p['greedy_agreement']:.1%}"
        for name, p in parity.items()
    ) if parity else "parity not checked (--no-validate)"
    click.echo(f"export written to {out} ({manifest['flavor']}, {manifest['precision']}); parity {verdict}")


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--prompt", default=None, help="Prompt text; with --chat, the first user message.")
@click.option("--chat", is_flag=True,
              help="Chat through the model's chat template: one user message per line of stdin, the history kept; "
                   "end with Ctrl-D.")
@click.option("--system", default=None, help="With --chat: a system message that opens the conversation.")
@click.option("--adapter", default=None, help="Adapter to activate, for an export of flavor adapters (default: none, the base).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
              help="Penalty on tokens already in the prompt or the output, as in CTRL (1: off).")
@click.option("--stop", multiple=True, help="A string that ends the generation (not printed); repeat for several. "
                                            "In bash, $'\\n' is a newline.")
@click.option("--truncate", type=click.Choice(["none", "left"]), default="none", show_default=True,
              help="A prompt longer than the context minus --max-new-tokens: refuse it (none) or drop its start (left).")
@click.option("--seed", type=int, default=None, help="Sampler seed.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--device", default=None, help="Device profile for providers and threads.")
@click.option("--providers", default=None, help="Comma-separated execution providers, overriding the profile.")
@click.option("--strict-providers", is_flag=True,
              help="Refuse a provider this onnxruntime build lacks instead of falling back to the next one.")
@click.option("--threads", type=int, default=None, help="Intra-op threads (0: one per physical core).")
@click.option("--no-kernels", is_flag=True,
              help="Run the export's portable graph even where one of edge-lora's own kernels would run.")
def run(export_dir, prompt, chat, system, adapter, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop,
        truncate, seed, stream, device, providers, strict_providers, threads, no_kernels):
    """Generate from an export on the torch-free runtime (onnxruntime).

    \b
    Example:  edge-lora run demo-out/export-int4 --prompt "2024-03-17 ->" --max-new-tokens 16
              edge-lora run my-export --chat --system "Answer in one line." --stream
    """
    from edge_lora import runtime

    if prompt is None and not chat:
        raise UsageError("run needs --prompt TEXT, or --chat for a conversation on stdin — see 'edge-lora run --help'")
    if system is not None and not chat:
        raise UsageError(f"--system {system!r} applies to --chat only — add --chat, or put the text in --prompt")
    sampling = runtime.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, seed=seed, repetition_penalty=repetition_penalty, stop=stop,
                                      truncate=truncate)
    generator = runtime.load(export_dir, providers=providers.split(",") if providers else None, device=device,
                             threads=threads, strict_providers=strict_providers,
                             kernels=() if no_kernels else None).with_adapter(adapter)
    if chat:
        chat_loop(generator, sampling, prompt, system, stream)
    else:
        print_reply(generator, prompt, sampling, stream)


def print_reply(generator, prompt: str | list[int], sampling, stream: bool) -> str:
    """Generate from `prompt` and print the text (as it comes, with `stream`); returns the text."""
    if not stream:
        text = generator.generate(prompt, sampling).text
        click.echo(text)
        return text
    deltas = []
    for delta in generator.stream(prompt, sampling):
        click.echo(delta, nl=False)
        deltas.append(delta)
    click.echo()
    return "".join(deltas)


def chat_loop(generator, sampling, first: str | None, system: str | None, stream: bool) -> None:
    """A conversation: each stdin line (after `first`, if given) is a user message; each reply is printed and
    kept, so that the next turn's prompt holds the whole history."""
    generator.require_chat_template()  # before the user types anything
    interactive = sys.stdin.isatty()
    messages = [{"role": "system", "content": system}] if system else []
    pending = [first] if first else []
    while True:
        if pending:
            line = pending.pop()
        else:
            if interactive:
                click.echo("> ", nl=False, err=True)
            line = sys.stdin.readline()
            if not line:  # end of input
                return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = print_reply(generator, generator.render_chat(messages), sampling, stream)
        messages.append({"role": "assistant", "content": reply})


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="EDGE_LORA_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health [env: EDGE_LORA_API_KEY].")
@click.option("--workers", type=int, default=None,
              help="Generations at once [default: the host's physical cores / threads per worker, at least 1].")
@click.option("--queue-size", type=int, default=32, show_default=True,
              help="Requests that may wait for a worker; one more is answered 429.")
@click.option("--queue-timeout", type=float, default=60.0, show_default=True,
              help="Seconds a request may wait for a worker before it is answered 503.")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True, help="Larger bodies get 413.")
@click.option("--admin-max-body-bytes", type=int, default=1 << 30, show_default=True,
              help="Largest adapter upload to /admin/adapters/NAME (see 'edge-lora serve-admin').")
@click.option("--grace-period", type=float, default=10.0, show_default=True,
              help="On SIGTERM, seconds in-flight requests may take to finish before they are cancelled.")
@click.option("--device", default=None, help="Device profile for providers and threads.")
@click.option("--threads", type=int, default=None, help="Intra-op threads per worker (0: one per physical core).")
def serve(export_dir, host, port, api_key, workers, queue_size, queue_timeout, max_body_bytes, admin_max_body_bytes,
          grace_period, device, threads):
    """Serve an export (and its adapters) over OpenAI's HTTP API: /v1/completions, /v1/chat/completions,
    /v1/models, /health and /metrics. Needs the extra: pip install 'edge-lora[serve]'. With --api-key, adapter
    versions can be loaded and rolled back while serving (see 'edge-lora serve-admin').

    \b
    Example:  edge-lora serve demo-out/export-int4 --port 8000
              curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
                   -d '{"model": "export-int4", "prompt": "2024-03-17 ->", "max_tokens": 16}'
    """
    try:
        from edge_lora.runtime.serve.app import ServeConfig, ServeError, serve as run_server
    except ImportError as e:
        raise UsageError(f"serving needs FastAPI and uvicorn ({e}) — pip install 'edge-lora[serve]'") from None
    try:
        config = ServeConfig(host=host, port=port, api_key=api_key, workers=workers, queue_size=queue_size,
                             queue_timeout_s=queue_timeout, max_body_bytes=max_body_bytes,
                             admin_max_body_bytes=admin_max_body_bytes, grace_s=grace_period)
        run_server(export_dir, config, device=device, threads=threads)
    except ServeError as e:
        raise UsageError(str(e)) from None


@cli.group("serve-admin")
def serve_admin():
    """Roll out adapter versions on a running 'edge-lora serve' (started with --api-key): push a new version,
    roll back to the one before, list what is live. Every response of the server names the version that
    produced it (the X-Model-Version header and the model field, 'name@version').

    \b
    Example:  edge-lora serve-admin push http://device:8000 my-adapter new-export/adapters/my-adapter.onnx_adapter
              edge-lora serve-admin rollback http://device:8000 my-adapter
    """


def admin_call(call, *args) -> None:
    from edge_lora.runtime.serve.client import AdminClientError

    try:
        click.echo(json.dumps(call(*args), indent=2))
    except AdminClientError as e:
        raise UsageError(str(e)) from None


API_KEY_OPTION = click.option("--api-key", default=None, envvar="EDGE_LORA_API_KEY",
                              help="The server's API key [env: EDGE_LORA_API_KEY].")


@serve_admin.command("push")
@click.argument("url")
@click.argument("name")
@click.argument("adapter_file", type=click.Path())
@API_KEY_OPTION
def serve_admin_push(url, name, adapter_file, api_key):
    """Upload ADAPTER_FILE (.onnx_adapter) as the next version of adapter NAME; the server checks it against its
    model (422, and the live version stays, if it does not fit) and keeps the version it replaces for rollback.

    \b
    Example:  edge-lora serve-admin push http://127.0.0.1:8000 my-adapter v2/adapters/my-adapter.onnx_adapter
    """
    from edge_lora.runtime.serve.client import push

    admin_call(push, url, name, adapter_file, api_key)


@serve_admin.command("rollback")
@click.argument("url")
@click.argument("name")
@API_KEY_OPTION
def serve_admin_rollback(url, name, api_key):
    """Put back the version adapter NAME had before its live one (the same weights, so the same outputs).

    \b
    Example:  edge-lora serve-admin rollback http://127.0.0.1:8000 my-adapter
    """
    from edge_lora.runtime.serve.client import rollback

    admin_call(rollback, url, name, api_key)


@serve_admin.command("list")
@click.argument("url")
@API_KEY_OPTION
def serve_admin_list(url, api_key):
    """Every adapter the server at URL serves: its live version and those a rollback goes back through.

    \b
    Example:  edge-lora serve-admin list http://127.0.0.1:8000
    """
    from edge_lora.runtime.serve.client import adapters

    admin_call(adapters, url, api_key)


class ProfileGroup(click.Group):
    """`edge-lora profile EXPORT_DIR ...` profiles; `edge-lora profile compare A.json B.json` compares."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["measure", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=ProfileGroup)
def profile():
    """Measure latency of an export (MLPerf single-stream style), or compare reports.

    \b
    Example:  edge-lora profile demo-out/export-int4 --threads 1,2 --prompt-lens 16,64 --new-tokens 32 --out prof
              edge-lora profile compare prof-a/profile.json prof-b/profile.json
    """


@profile.command("measure")
@click.argument("export_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--device", default=None, help="Device profile (providers, threads, bandwidth).")
@click.option("--providers", default=None,
              help="Comma-separated execution providers to sweep, each on its own [default: the profile's list].")
@click.option("--threads", default="0", show_default=True, help="Comma-separated thread counts (0: the profile's).")
@click.option("--prompt-lens", default="128", show_default=True, help="Comma-separated prompt lengths in tokens.")
@click.option("--adapters", default=None,
              help="Comma-separated adapters to sweep on an export of flavor adapters, each against no adapter "
                   "[default: all of its adapters].")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="New tokens per run (end-of-sequence ignored).")
@click.option("--warmup-runs", type=int, default=2, show_default=True, help="Unrecorded runs per configuration first.")
@click.option("--min-runs", type=int, default=5, show_default=True)
@click.option("--min-seconds", type=float, default=2.0, show_default=True)
@click.option("--trace", is_flag=True, help="Trace one more run per configuration with onnxruntime profiling; "
                                            "report the top operators and keep the traces in --out.")
@click.option("--measure-bandwidth", is_flag=True,
              help="Set decode speed against this host's measured bandwidth, not the device profile's.")
@click.option("--out", default="profile-out", show_default=True,
              help="Dir for profile.json, profile.csv, profile.md, the PNG plots and traces.")
def profile_measure(export_dirs, device, providers, threads, prompt_lens, adapters, new_tokens, warmup_runs, min_runs,
                    min_seconds, trace, measure_bandwidth, out):
    """Profile one or more exports (say one per precision) across adapters (on and off), providers, threads and
    prompt lengths, each configuration in a process of its own: warm-up, then runs until both --min-runs and
    --min-seconds are met. A provider this host lacks is reported as unavailable.

    \b
    Example:  edge-lora profile demo-out/export-fp32 demo-out/export-int4 --threads 1,2 --prompt-lens 16,64 --new-tokens 32
              edge-lora profile my-export --providers CUDAExecutionProvider,CPUExecutionProvider --trace --out prof
              edge-lora profile shared-export --adapters my-adapter --threads 2 --out prof
    """
    from edge_lora.runtime.profile.sweep import ProfileSettings, profile as run_profile
    from edge_lora.runtime.profile.report import PLOTS_SKIPPED, render_adapter_table, render_table, write_report

    settings = ProfileSettings(
        threads=csv_ints(threads, "--threads"), prompt_lens=csv_ints(prompt_lens, "--prompt-lens"),
        new_tokens=new_tokens, warmup_runs=warmup_runs, min_runs=min_runs, min_seconds=min_seconds,
        providers=tuple(p.strip() for p in providers.split(",") if p.strip()) if providers else None, device=device,
        adapters=tuple(a.strip() for a in adapters.split(",") if a.strip()) if adapters is not None else None,
        trace=trace, measure_bandwidth=measure_bandwidth,
    )
    report = run_profile(list(export_dirs), settings, trace_dir=out)
    paths = write_report(report, out)
    click.echo(render_table(report))
    if adapters_table := render_adapter_table(report):
        click.echo(f"Adapters against the base model (on ÷ off):\n\n{adapters_table}")
    click.echo(f"report: {', '.join(str(p) for p in paths.values())}")
    if "latency_cdf" not in paths:
        click.echo(PLOTS_SKIPPED)


@profile.command("compare")
@click.argument("reports", nargs=-1, required=True, type=click.Path())
@click.option("--fail-if-slower", default=None, metavar="PERCENT",
              help="Exit 1 when a configuration's decode tok/s is lower, or e2e p50 higher, than the first "
                   "report's by more than this, e.g. 10%.")
def profile_compare(reports, fail_if_slower):
    """Ratio tables of profile reports against the first one, matched by precision, adapter, provider, threads
    and prompt length, and of each adapter against no adapter; with --fail-if-slower, a regression gate for CI
    (exit 1 on a regression). One report with adapters gives the adapter table alone.

    \b
    Example:  edge-lora profile compare base/profile.json new/profile.json --fail-if-slower 10%
              edge-lora profile compare prof/profile.json
    """
    from edge_lora.runtime.profile.compare import compare, load_report, parse_margin

    margin = None if fail_if_slower is None else parse_margin(fail_if_slower)
    table, regressions = compare([load_report(path) for path in reports], margin, names=list(reports))
    click.echo(table)
    if regressions:
        click.echo(f"{len(regressions)} regression(s) beyond {fail_if_slower}:")
        for regression in regressions:
            click.echo(f"  {regression}")
        sys.exit(1)  # not click's Exit: main() runs click non-standalone, which returns an Exit's code unused


class EvalGroup(click.Group):
    """`edge-lora eval TARGET ...` evaluates; `edge-lora eval compare OLD NEW ...` is the regression gate."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["target", *args]
        return super().parse_args(ctx, args)


def eval_options(command):
    """The options `eval` and `eval compare` share."""
    from edge_lora.eval.metrics import METRICS

    options = [
        click.option("--data", required=True, multiple=True,
                     help="Eval JSONL (prompt/completion, messages, or text for perplexity); repeat for one row each."),
        click.option("--metric", type=click.Choice(METRICS), default="exact", show_default=True,
                     help="exact / contains (Wilson interval), token-f1 / perplexity (bootstrap interval)."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
                     help="Greedy tokens per sample [default: the longest reference's tokens + 2]."),
        click.option("--base", default=None, help="Base model dir of an adapter target, if not where its manifest says."),
        click.option("--device", default=None, help="Device profile of an export target (providers, threads)."),
        click.option("--threads", type=int, default=None, help="Intra-op threads of an export target."),
        click.option("--out", default="eval-samples.jsonl", show_default=True,
                     help="Per-sample results, one JSON object per sample (written here, never into a target or data dir)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.group("eval", cls=EvalGroup)
def eval_group():
    """Evaluate an adapter dir (PyTorch: its 4-bit base with the adapter) or an export dir (the runtime) on eval
    files: the metric with a 95% confidence interval and the latency per sample, one row per --data file; or
    compare two targets on the same samples, a regression gate.

    \b
    Example:  edge-lora eval demo-out/export-int4 --data demo-out/data/eval.jsonl
              edge-lora eval my-adapter --data in_dist.jsonl --data ood.jsonl --metric token-f1 --out my-adapter.jsonl
              edge-lora eval compare demo-out/export-fp32 demo-out/export-int4 --data demo-out/data/eval.jsonl --fail-if-worse 2
    """


@eval_group.command("target")
@click.argument("target", type=click.Path())
@click.option("--adapter", default=None, help="Adapter to activate, for an export of flavor adapters (default: the base).")
@eval_options
def eval_target(target, adapter, data, metric, max_new_tokens, base, device, threads, out, quiet):
    """Evaluate one target (an adapter dir or an export dir) on one or more eval files.

    \b
    Example:  edge-lora eval demo-out/export-int4 --data demo-out/data/eval.jsonl --metric exact
    """
    from edge_lora.eval.report import eval_table, write_samples
    from edge_lora.eval.run import EvalSettings, evaluate

    settings = EvalSettings(metric=metric, max_new_tokens=max_new_tokens, base=base, device=device, threads=threads)
    report = evaluate(target, list(data), settings, adapter=adapter, show_progress=not quiet)
    click.echo(eval_table(report))
    click.echo(f"per-sample results: {write_samples([report], out)}")


@eval_group.command("compare")
@click.argument("old", type=click.Path())
@click.argument("new", type=click.Path())
@click.option("--old-adapter", default=None, help="Adapter of OLD, for an export of flavor adapters.")
@click.option("--new-adapter", default=None, help="Adapter of NEW, for an export of flavor adapters.")
@click.option("--fail-if-worse", type=float, default=None, metavar="POINTS",
              help="Exit 1 when NEW is worse than OLD by more than POINTS (percentage points; perplexity units for "
                   "perplexity) AND the paired test gives p < 0.05 (McNemar exact for exact/contains, sign test "
                   "otherwise).")
@eval_options
def eval_compare(old, new, old_adapter, new_adapter, fail_if_worse, data, metric, max_new_tokens, base, device, threads,
                 out, quiet):
    """Compare two adapter versions or two exports (say fp32 and int4) on the same samples, paired; with
    --fail-if-worse, a regression gate for CI (exit 1 on a regression). Both must share a tokenizer.

    \b
    Example:  edge-lora eval compare demo-out/export-fp32 demo-out/export-int4 --data demo-out/data/eval.jsonl --fail-if-worse 2
              edge-lora eval compare adapter-v1 adapter-v2 --data eval.jsonl --metric token-f1 --fail-if-worse 1
    """
    from edge_lora.eval.compare import compare
    from edge_lora.eval.report import compare_table, write_samples
    from edge_lora.eval.run import EvalSettings

    settings = EvalSettings(metric=metric, max_new_tokens=max_new_tokens, base=base, device=device, threads=threads)
    comparison = compare(old, new, list(data), settings, margin=fail_if_worse, old_adapter=old_adapter,
                         new_adapter=new_adapter, show_progress=not quiet)
    click.echo(compare_table(comparison))
    click.echo(f"per-sample results: {write_samples([comparison.old, comparison.new], out)}")
    if comparison.failed:
        worse = [p.data for p in comparison.pairings if p.worse_beyond_margin]
        click.echo(f"NEW is worse than OLD beyond the margin of {fail_if_worse:g} (with p < 0.05) on {', '.join(worse)}")
        sys.exit(1)  # not click's Exit: main() runs click non-standalone, which returns an Exit's code unused


@cli.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the lineage tree as JSON.")
@click.option("--verify-base", is_flag=True, help="Also recompute the base model's fingerprint (reads all its weights).")
def inspect_command(path, as_json, verify_base):
    """Print the lineage of an export dir or an adapter dir — export, adapter(s), base model, training and eval
    data — each parent still on disk checked against its recorded digest (matches, changed, missing).

    \b
    Example:  edge-lora inspect demo-out/export-int4
              edge-lora inspect demo-out/adapter --json
    """
    from edge_lora.lineage import inspect, render

    tree = inspect(path, verify_base=verify_base)
    click.echo(json.dumps(tree, indent=2) if as_json else render(tree))


@cli.group()
def devices():
    """Device profiles: list them, show one, or detect this host.

    \b
    Example:  edge-lora devices detect
    """


@devices.command("list")
def devices_list():
    """List the shipped device profiles."""
    from edge_lora import devices as dev

    for p in dev.load_all():
        providers = ", ".join(x.name.removesuffix("ExecutionProvider") for x in p.providers)
        click.echo(f"{p.name:18} {p.precision:5} {providers:32} {p.description}")


@devices.command("show")
@click.argument("name")
def devices_show(name):
    """Show one profile as TOML-shaped JSON.

    \b
    Example:  edge-lora devices show arm64-a76
    """
    from edge_lora import devices as dev

    click.echo(json.dumps(dev.load(name).to_dict(), indent=2))


@devices.command("detect")
def devices_detect():
    """Describe this host (CPU, cores, memory, providers, measured bandwidth) and name the closest profile."""
    import dataclasses

    import onnxruntime

    from edge_lora import devices as dev

    host = dev.detect(onnxruntime.get_available_providers())
    click.echo(json.dumps(dataclasses.asdict(host), indent=2))


def bad_input_types() -> tuple[type[Exception], ...]:
    """Errors that mean the user's input was wrong; each carries a one-line message with the fix."""
    from edge_lora.devices import DeviceProfileError
    from edge_lora.runtime import ChatError, ExportError, PromptError, ProviderError
    from edge_lora.runtime.profile.sweep import ProfileError

    return UsageError, DeviceProfileError, ExportError, PromptError, ProviderError, ProfileError, ChatError


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="edge-lora", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx else "edge-lora"
        click.echo(f"error: {e.format_message()} — see '{command} --help'", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except bad_input_types() as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except Exception as e:
        from edge_lora.demo.run import DemoStepError

        if isinstance(e, DemoStepError):
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        raise
