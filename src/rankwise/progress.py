"""What the user sees while work runs: progress bars and one line per layer.

The library talks to a `Reporter`; the silent one is the default for the Python API, the rich one
is what the CLI passes in. No global state: whoever runs the work chooses the reporter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# advance(n=1, status=None): n more items done; `status` (e.g. "loss 2.31, 840 tok/s") is shown
# beside the bar
Advance = Callable[..., None]


class Reporter:
    """Silent reporter; subclasses draw."""

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda n=1, status=None: None

    def log(self, message: str) -> None:
        pass


class RichReporter(Reporter):
    """rich progress bars on stderr, log lines above them."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        ]
        with Progress(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total, status="")

            def advance(n: int = 1, status: str | None = None) -> None:
                if status is None:
                    bar.advance(task_id, n)
                else:
                    bar.update(task_id, advance=n, status=status)

            yield advance

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)


class Timer:
    """Wall-clock seconds of named phases, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
