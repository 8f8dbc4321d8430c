"""Progress bars: rich's on a terminal, nothing at all on logs, pipes and in tests."""

from __future__ import annotations

import sys

# Short names for rich's column classes; any other string is a TextColumn format.
_COLUMNS = {"bar": "BarColumn", "count": "MofNCompleteColumn", "bytes": "DownloadColumn",
            "eta": "TimeRemainingColumn"}


class ProgressBar:
    """A started rich progress bar with `columns`, or a silent stand-in when not `enabled`
    (default: when stderr is a terminal). Lines given to `print` go above a live bar."""

    def __init__(self, *columns: str, enabled: bool | None = None, transient: bool = True,
                 stderr: bool = True):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = None
        if enabled:
            import rich.progress
            from rich.console import Console

            made = [getattr(rich.progress, _COLUMNS[c])() if c in _COLUMNS else c
                    for c in columns]
            self.bar = rich.progress.Progress(*made, transient=transient,
                                              console=Console(stderr=stderr))
            self.bar.start()

    def add(self, label: str, total: int, completed: int = 0, **fields):
        """A new task line; returns its id (None without a bar)."""
        if self.bar is None:
            return None
        return self.bar.add_task(label, total=total, completed=completed, **fields)

    def update(self, task, **values) -> None:
        """Set a task's completed count or fields."""
        if self.bar is not None:
            self.bar.update(task, **values)

    def advance(self, task) -> None:
        """One more unit of `task` done."""
        if self.bar is not None:
            self.bar.advance(task)

    def print(self, line: str) -> None:
        """A line of output: above the live bar, or plainly on stdout."""
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Stop the bar (idempotent)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
