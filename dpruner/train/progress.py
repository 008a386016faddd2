"""Rich progress bars on stderr (epoch, batch, loss, accuracy, ETA); silent with --quiet, off a TTY, or off rank 0."""

from __future__ import annotations

import sys
from contextlib import contextmanager


def progress_enabled(quiet: bool, is_main: bool) -> bool:
    return not quiet and is_main and sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: int, enabled: bool):
    """Yields update(advance=1, **fields); fields 'loss' and 'acc' are shown next to the bar."""
    if not enabled:
        yield lambda advance=1, **fields: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, loss="-", acc="-")

        def update(advance: int = 1, **fields) -> None:
            shown = {k: f"{v:.4f}" if k == "loss" else f"{100 * v:.2f}%" for k, v in fields.items()}
            bar.update(task, advance=advance, **shown)

        yield update
