"""What the command modules share: a group with a default command, and comma-separated options."""

from __future__ import annotations

import click

from edge_lora.errors import UsageError


class DefaultGroup(click.Group):
    """A group whose arguments go to its `default` command unless they name one of its commands (or ask for help):
    `edge-lora profile EXPORT_DIR ...` is `edge-lora profile measure EXPORT_DIR ...`."""

    def __init__(self, *args, default: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default, *args]
        return super().parse_args(ctx, args)


def csv_strings(value: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as its non-empty items, stripped; None when the option was not given."""
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def csv_ints(value: str, name: str) -> tuple[int, ...]:
    """A comma-separated option of integers >= 0, named `name` in the error."""
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{name} {value!r} is not a comma-separated list of integers — for example 1,2,4") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"{name} {value!r} needs one or more integers >= 0 — for example 1,2,4")
    return values
