"""What the user sees while work runs: progress bars and one line per layer.

The library talks to a `Reporter`; the silent one is the default for the Python API, the rich one
is what the CLI passes in. No global state: whoever runs the work chooses the reporter.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

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


class PlainReporter(Reporter):
    """Plain lines for a log file, a pipe, CI or `nohup` (rich's live bars print nothing there).

    Each task prints its start, a line per finished item (at most one per `min_interval`
    seconds, with the item's time), and its end with seconds; while an item runs longer than
    `heartbeat` seconds, a "still running" line says the run is alive.
    """

    def __init__(
        self, stream: TextIO | None = None, min_interval: float = 5.0, heartbeat: float = 30.0
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval, self.heartbeat = min_interval, heartbeat
        self._lock = threading.Lock()

    def _print(self, line: str) -> None:
        with self._lock:
            print(line, file=self.stream, flush=True)

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        lines = _TaskLines(self, description, total)
        self._print(f"[{description}] start" + (f", {total} items" if total is not None else ""))
        stop = threading.Event()
        watcher = threading.Thread(target=lines.beat, args=(stop,), daemon=True)
        watcher.start()
        try:
            yield lines.advance
        finally:
            stop.set()
            watcher.join()
            self._print(f"[{description}] done: {lines.count()} in {lines.elapsed():.1f} s")

    def log(self, message: str) -> None:
        self._print(message)


class _TaskLines:
    """One plain task's counters: items done, when the last item ended, when a line was printed."""

    def __init__(self, owner: PlainReporter, description: str, total: int | None) -> None:
        self.owner, self.description, self.total = owner, description, total
        self.start = self.last_item = self.last_line = time.perf_counter()
        self.done = 0

    def count(self) -> str:
        return f"{self.done}/{self.total}" if self.total is not None else str(self.done)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def advance(self, n: int = 1, status: str | None = None) -> None:
        now = time.perf_counter()
        self.done += n
        finished = self.total is not None and self.done >= self.total
        if n and (now - self.last_line >= self.owner.min_interval or finished):
            extra = f"  {status}" if status else ""
            took = now - self.last_item
            self.owner._print(
                f"[{self.description}] {self.count()} (+{took:.1f} s, "
                f"{now - self.start:.0f} s in){extra}"
            )
            self.last_line = now
        self.last_item = now

    def beat(self, stop: threading.Event) -> None:
        """Print "still running" when nothing was printed for `heartbeat` seconds."""
        while not stop.wait(self.owner.heartbeat / 3):
            now = time.perf_counter()
            if now - self.last_line >= self.owner.heartbeat:
                self.owner._print(
                    f"[{self.description}] still running: {self.count()}, "
                    f"{now - self.start:.0f} s in"
                )
                self.last_line = now


def cli_reporter() -> Reporter:
    """Rich bars on a terminal, plain lines anywhere else (a file, a pipe, CI)."""
    return RichReporter() if sys.stderr.isatty() else PlainReporter()


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
