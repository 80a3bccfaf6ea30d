"""Where output goes: data on stdout (rich tables, or JSON), chatter and progress on stderr.

Progress bars only on an interactive terminal and never in --json / --quiet mode. rich is imported on
first use (it costs more than the rest of `awqpad --help`). Off a terminal, rendered text is written
without trailing spaces. Every piece of data passed to rich markup goes through `esc` first: rule ids like
`[dense-down-groups]` and paths like `/data/[v2]model` are text, not markup.
"""

from __future__ import annotations

import io
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator


def esc(value: Any) -> str:
    """`value` as text that rich markup prints verbatim."""
    from rich.markup import escape

    return escape(str(value))


def strip_trailing(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.split("\n"))


class Output:
    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self._console = None
        self._err = None
        self.interactive = sys.stderr.isatty() and not json_mode and not quiet

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False, soft_wrap=False)
            if not self._console.is_terminal:  # pipes and logs: wide lines that grep can find, no wrapping at 80
                self._console = Console(highlight=False, width=200, file=io.StringIO())
        return self._console

    @property
    def err(self):
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False)
        return self._err

    def result(self, data: Any, render: Callable[[Any], None]) -> None:
        if self.json_mode:
            from awqpad.serialize import dumps

            sys.stdout.write(dumps(data) + "\n")
            sys.stdout.flush()
        elif not self.quiet:
            console = self.console
            render(console)
            if isinstance(console.file, io.StringIO):  # not a terminal: drop the padding rich adds
                text = console.file.getvalue()
                console.file.seek(0)
                console.file.truncate()
                sys.stdout.write(strip_trailing(text))
                sys.stdout.flush()

    def info(self, message: str) -> None:
        if not self.quiet and not self.json_mode:
            self.err.print(message, markup=False)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"warning: {message}", markup=False)

    @contextmanager
    def progress(self, total: int, description: str) -> Iterator[Callable[[int], None]]:
        """Yield an `advance(nbytes)` callback; draws a byte progress bar on a TTY only."""
        if not self.interactive:
            yield lambda n: None
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=self.err, transient=True,
        )
        with bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
