"""Transfer progress on a console: a bar per file in flight and one for everything.

On a terminal the bars are live; elsewhere (a pipe, a CI log) each finished file is one line,
so logs stay readable and nothing is redrawn.
"""

from __future__ import annotations

import threading
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from sdfleet.models.sync import mib


class ConsoleBars:
    """``models.progress.Progress`` on a rich console; use as a context manager."""

    def __init__(self, console: Console, total: int, title: str) -> None:
        self.console = console
        self.live = console.is_terminal
        self.moved = 0
        """Bytes that really moved (resumed bytes excluded)."""
        self._lock = threading.Lock()
        self._bars = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self._total = total
        self._all = self._bars.add_task(title, total=total)
        self._files: dict[str, TaskID] = {}
        self._sizes: dict[str, int] = {}

    def __enter__(self) -> ConsoleBars:
        self._bars.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bars.__exit__(kind, e, tb)

    def start(self, label: str, total: int, done: int = 0) -> None:
        with self._lock:
            self._sizes[label] = total
            self._files[label] = self._bars.add_task(f"  {label}", total=total, completed=done)
            self._total += total  # the overall bar grows as files are found to move
            self._bars.update(self._all, total=self._total, advance=done)
        if done and not self.live:
            self.console.print(f"resuming {label} at {mib(done)} of {mib(total)}", soft_wrap=True)

    def advance(self, label: str, n: int) -> None:
        with self._lock:
            task = self._files.get(label)
            self.moved += n
        if task is not None:
            self._bars.advance(task, n)
        self._bars.advance(self._all, n)

    def finish(self, label: str) -> None:
        with self._lock:
            task = self._files.pop(label, None)
            size = self._sizes.pop(label, 0)
        if task is not None:
            self._bars.remove_task(task)
        self._bars.console.print(f"  ✓ {label} ({mib(size)})", soft_wrap=True, highlight=False)
