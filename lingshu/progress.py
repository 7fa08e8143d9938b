"""Rich progress bars and the ``lingshu`` logger (stderr, off when not wanted)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["progress_bar", "setup_logging", "stderr_console"]

stderr_console = Console(stderr=True)


class _NoBar:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **_: object) -> None:
        pass


class _Bar:
    def __init__(self, progress: Progress, task) -> None:
        self._p, self._t = progress, task

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._t, n)

    def update(self, **fields: object) -> None:
        desc = fields.pop("description", None)
        self._p.update(self._t, description=desc, **fields) if desc else self._p.update(self._t, **fields)


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator[_Bar | _NoBar]:
    """A rich progress bar on stderr, or a no-op when ``enabled`` is false."""
    if not enabled:
        yield _NoBar()
        return
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=stderr_console, transient=False) as p:
        yield _Bar(p, p.add_task(description, total=total, info=""))


def setup_logging(level: int = logging.INFO) -> None:
    """Attach one rich handler (stderr) to the ``lingshu`` logger."""
    log = logging.getLogger("lingshu")
    log.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=stderr_console, show_path=False, rich_tracebacks=False))
    log.propagate = False


def is_tty() -> bool:
    """Whether stderr is a terminal (progress bars default to on only then)."""
    return sys.stderr.isatty()
