"""`edge-lora run`: generate from an export on the torch-free runtime, once or as a chat on stdin."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from edge_lora.cli.common import csv_strings
from edge_lora.errors import UsageError

if TYPE_CHECKING:
    from edge_lora.runtime import Generator, SamplingConfig


@click.command("run")
@click.argument("export_dir", type=click.Path())
@click.option("--prompt", default=None, help="Prompt text; with --chat, the first user message.")
@click.option(
    "--chat",
    is_flag=True,
    help="Chat through the model's chat template: one user message per line of stdin, the history kept; "
    "end with Ctrl-D.",
)
@click.option("--system", default=None, help="With --chat: a system message that opens the conversation.")
@click.option(
    "--adapter", default=None, help="Adapter to activate, for an export of flavor adapters (default: none, the base)."
)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option(
    "--repetition-penalty",
    type=float,
    default=1.0,
    show_default=True,
    help="Penalty on tokens already in the prompt or the output, as in CTRL (1: off).",
)
@click.option(
    "--stop",
    multiple=True,
    help="A string that ends the generation (not printed); repeat for several. In bash, $'\\n' is a newline.",
)
@click.option(
    "--truncate",
    type=click.Choice(["none", "left"]),
    default="none",
    show_default=True,
    help="A prompt longer than the context minus --max-new-tokens: refuse it (none) or drop its start (left).",
)
@click.option("--seed", type=int, default=None, help="Sampler seed.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--device", default=None, help="Device profile for providers and threads.")
@click.option("--providers", default=None, help="Comma-separated execution providers, overriding the profile.")
@click.option(
    "--strict-providers",
    is_flag=True,
    help="Refuse a provider this onnxruntime build lacks instead of falling back to the next one.",
)
@click.option("--threads", type=int, default=None, help="Intra-op threads (0: one per physical core).")
@click.option(
    "--no-kernels",
    is_flag=True,
    help="Run the export's portable graph even where one of edge-lora's own kernels would run.",
)
def run(
    export_dir: str,
    prompt: str | None,
    chat: bool,
    system: str | None,
    adapter: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    stop: tuple[str, ...],
    truncate: str,
    seed: int | None,
    stream: bool,
    device: str | None,
    providers: str | None,
    strict_providers: bool,
    threads: int | None,
    no_kernels: bool,
) -> None:
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
    sampling = runtime.SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
        stop=stop,
        truncate=truncate,
    )
    generator = runtime.load(
        export_dir,
        providers=list(csv_strings(providers)) if providers else None,
        device=device,
        threads=threads,
        strict_providers=strict_providers,
        kernels=() if no_kernels else None,
    ).with_adapter(adapter)
    if chat:
        chat_loop(generator, sampling, prompt, system, stream)
    else:
        print_reply(generator, prompt, sampling, stream)


def print_reply(generator: Generator, prompt: str | list[int], sampling: SamplingConfig, stream: bool) -> str:
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


def chat_loop(
    generator: Generator, sampling: SamplingConfig, first: str | None, system: str | None, stream: bool
) -> None:
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
