"""Where output goes: data on stdout (rich tables, or JSON), chatter and progress on stderr.

Progress bars only on an interactive terminal and never in --json / --quiet mode.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from awqpad.serialize import dumps


class Output:
    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.console = Console(highlight=False, soft_wrap=False)
        if not self.console.is_terminal:  # pipes and logs: wide lines that grep can find, no wrapping at 80
            self.console = Console(highlight=False, width=200)
        self.err = Console(stderr=True, highlight=False)
        self.interactive = self.err.is_terminal and not json_mode and not quiet

    def result(self, data: Any, render: Callable[[Console], None]) -> None:
        if self.json_mode:
            sys.stdout.write(dumps(data) + "\n")
            sys.stdout.flush()
        elif not self.quiet:
            render(self.console)

    def info(self, message: str) -> None:
        if not self.quiet and not self.json_mode:
            self.err.print(message)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"warning: {message}", markup=False)

    @contextmanager
    def progress(self, total: int, description: str) -> Iterator[Callable[[int], None]]:
        """Yield an `advance(nbytes)` callback; draws a byte progress bar on a TTY only."""
        if not self.interactive:
            yield lambda n: None
            return
        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=self.err, transient=True,
        )
        with bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
