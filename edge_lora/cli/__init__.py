"""The `edge-lora` command: a thin click layer over the stage functions, one module per command group.

Each command turns its options (and a TOML file, for train) into its stage's config and makes one call. It
imports the stage's dependencies inside its body, so that `edge-lora run` on a device needs only the runtime's.
`main` turns bad input into one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

import click

from edge_lora.cli.base import base
from edge_lora.cli.demo import demo
from edge_lora.cli.devices import devices
from edge_lora.cli.eval import eval_group
from edge_lora.cli.export import export
from edge_lora.cli.inspect import inspect_command
from edge_lora.cli.profile import profile
from edge_lora.cli.run import run
from edge_lora.cli.serve import serve, serve_admin
from edge_lora.cli.train import train
from edge_lora.errors import UsageError

EXIT_BAD_INPUT = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edge-lora")
def cli():
    """edge-lora: QLoRA fine-tune a Hugging Face causal LM, export it to ONNX with proven parity, and run it
    torch-free on an edge device.

    \b
    Start with:  edge-lora demo --workdir demo-out
    """


for command in (demo, base, train, export, run, serve, serve_admin, profile, eval_group, inspect_command, devices):
    cli.add_command(command)


def bad_input_types() -> tuple[type[Exception], ...]:
    """Errors that mean the user's input was wrong; each carries a one-line message with the fix. UsageError covers
    the manifests' errors (edge_lora.formats: ExportError, ProfileError, AdapterError)."""
    from edge_lora.devices import DeviceProfileError
    from edge_lora.runtime import ChatError, PromptError, ProviderError

    return UsageError, DeviceProfileError, PromptError, ProviderError, ChatError


def main(argv: list[str] | None = None) -> None:
    """Run the command line on `argv` (default: sys.argv[1:]) and exit with its status."""
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

        if isinstance(e, DemoStepError):  # the step's name and error, earlier steps' outputs kept: exit 1
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        raise
