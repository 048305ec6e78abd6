"""Progress bars for long steps (rich), off when output is not for a person."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    """Yields `advance(n, status)`; a no-op when disabled."""
    if not enabled:
        yield lambda n=1, status="": None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str = "") -> None:
            progress.update(task, advance=n, status=status)

        yield advance
