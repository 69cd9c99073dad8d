"""Rich progress bars for the batches that the command runs through a model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Item = TypeVar("Item")


def batch_count(loader: Any, limit: int | None) -> int | None:
    """Return how many batches a run over ``loader`` takes, or ``None`` when it is unknown."""
    try:
        total = len(loader)
    except TypeError:
        return limit
    return total if limit is None else min(total, limit)


def track(
    batches: Iterable[Item], description: str, limit: int | None, console: Console
) -> Iterator[Item]:
    """Yield at most ``limit`` batches unchanged while a progress bar on ``console`` counts them.

    The generator stops by itself after ``limit`` batches, so the bar is closed even when the
    consumer would have stopped there.
    """
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task(description, total=batch_count(batches, limit))
        for index, batch in enumerate(batches):
            if limit is not None and index >= limit:
                break
            yield batch
            progress.advance(task)
