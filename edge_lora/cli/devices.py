"""`edge-lora devices`: the shipped device profiles, and this host."""

from __future__ import annotations

import json

import click


@click.group("devices")
def devices() -> None:
    """Device profiles: list them, show one, or detect this host.

    \b
    Example:  edge-lora devices detect
    """


@devices.command("list")
def devices_list() -> None:
    """List the shipped device profiles."""
    from edge_lora import devices as dev

    for p in dev.load_all():
        providers = ", ".join(x.name.removesuffix("ExecutionProvider") for x in p.providers)
        click.echo(f"{p.name:18} {p.precision:5} {providers:32} {p.description}")


@devices.command("show")
@click.argument("name")
def devices_show(name: str) -> None:
    """Show one profile as TOML-shaped JSON.

    \b
    Example:  edge-lora devices show arm64-a76
    """
    from edge_lora import devices as dev

    click.echo(json.dumps(dev.load(name).to_dict(), indent=2))


@devices.command("detect")
def devices_detect() -> None:
    """Describe this host (CPU, cores, memory, providers, measured bandwidth) and name the closest profile."""
    import dataclasses

    import onnxruntime

    from edge_lora import devices as dev

    host = dev.detect(onnxruntime.get_available_providers())
    click.echo(json.dumps(dataclasses.asdict(host), indent=2))
