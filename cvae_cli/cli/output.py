"""All printing: messages, errors, and progress (a bar on a terminal, a line every few seconds in a log)."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def rank_prefix() -> str:
    """`[rank r] ` under torchrun, so each process's line says whose it is."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f"[rank {rank}] " if world not in ("", "1") else ""



def _rate(task) -> float | None:
    """Frames per second since the job began. Not rich's own `task.speed`: that needs two updates
    within its last 30 s, and one chunk through the model on a CPU can take longer than that, so
    the rate and the time left would show only at the end, or never."""
    elapsed = task.elapsed
    return task.completed / elapsed if elapsed and task.completed else None


class FpsColumn(ProgressColumn):
    def render(self, task) -> Text:
        rate = _rate(task)
        return Text(f"{rate:.1f} frames/s" if rate else "", style="progress.data.speed")


class TimeLeftColumn(ProgressColumn):
    def render(self, task) -> Text:
        rate = _rate(task)
        if task.finished:
            left = 0
        elif rate is None or task.total is None:
            return Text("-:--:--", style="progress.remaining")
        else:
            left = int(max(task.total - task.completed, 0) / rate)
        return Text(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}", style="progress.remaining")


def BAR_COLUMNS() -> tuple[ProgressColumn, ...]:  # noqa: N802 (a constant, made fresh per bar)
    """A progress bar's columns: what, the bar, frames done/total, frames/s, time left."""
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), FpsColumn(), TimeLeftColumn())


class Output:
    """All printing goes through here, so `--quiet` silences everything but errors. On a terminal
    progress is a bar (frames through the model, frames/s, time left); elsewhere (logs, CI) a line
    every `every_s` seconds."""

    every_s = 5.0

    def __init__(self, quiet: bool = False, prefix: str = ""):
        self.quiet, self.prefix = quiet, prefix
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[yellow]warning:[/] {escape(message)}")

    def error(self, message: str) -> None:
        self.console.print(f"[bold red]error:[/] {escape(self.prefix + message)}")

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if self.quiet:
            yield lambda n: None
        elif self.console.is_terminal:
            with Progress(*BAR_COLUMNS(), console=self.console, transient=True) as bar:
                task = bar.add_task(escape(description), total=total)
                yield lambda n: bar.advance(task, n)
        else:
            yield _Ticker(self, description, total).advance


class _Ticker:
    """Progress for logs: one line every `Output.every_s` seconds, none for a job shorter than that."""

    def __init__(self, out: Output, description: str, total: int | None):
        self.out, self.description, self.total = out, description, total
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.out.every_s:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            rate = self.done / max(now - self.start, 1e-9)
            left = ""
            if self.total and rate > 0:  # as the bar's column: what is left at the rate so far
                s = int(max(self.total - self.done, 0) / rate)
                left = f", {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d} left"
            self.out.info(escape(f"{self.description}: {self.done}{of} frames, {rate:.1f} frames/s{left}"))
