"""All printing: messages, errors, and progress (a bar on a terminal, a line every few seconds in a log)."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def frames_done(done: float, total: int | None) -> str:
    """`12/40`; a photo's progress moves by tiles, so a fraction of a frame shows as `0.4/1`."""
    shown = f"{done:.0f}" if abs(done - round(done)) < 1e-6 else f"{math.floor(done * 10) / 10:.1f}"  # 0.99: 0.9
    return f"{shown}/{total}" if total else shown


def speed(rate: float) -> str:
    """Frames per second, or seconds per frame where a frame takes longer than a second (a large
    photo on a CPU), so a slow rate does not print as 0.0."""
    return f"{rate:.1f} frames/s" if rate >= 1 else f"{1 / rate:.{1 if rate > 0.1 else 0}f} s/frame"


def clock(seconds: int) -> str:
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _rate(task) -> float | None:
    """Frames per second since the job began. Not rich's own `task.speed`: that needs two updates
    within its last 30 s, and one chunk through the model on a CPU can take longer than that, so
    the rate and the time left would show only at the end, or never."""
    elapsed = task.elapsed
    return task.completed / elapsed if elapsed and task.completed else None


class FramesColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(frames_done(task.completed, task.total), style="progress.download")


class FpsColumn(ProgressColumn):
    def render(self, task) -> Text:
        rate = _rate(task)
        return Text(speed(rate) if rate else "", style="progress.data.speed")


class TimeLeftColumn(ProgressColumn):
    def render(self, task) -> Text:
        rate = _rate(task)
        if task.finished:
            left = 0
        elif rate is None or task.total is None:
            return Text("-:--:--", style="progress.remaining")
        else:
            left = int(max(task.total - task.completed, 0) / rate)
        return Text(clock(left), style="progress.remaining")


def BAR_COLUMNS() -> tuple[ProgressColumn, ...]:  # noqa: N802 (a constant, made fresh per bar)
    """A progress bar's columns: what, the bar, frames done/total, frames/s, time left."""
    return (TextColumn("{task.description}"), BarColumn(), FramesColumn(), FpsColumn(), TimeLeftColumn())


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
            rate = self.done / max(now - self.start, 1e-9)
            left = ""
            if self.total and rate > 0:  # as the bar's column: what is left at the rate so far
                left = f", {clock(int(max(self.total - self.done, 0) / rate))} left"
            shown = speed(rate) if rate > 0 else "0.0 frames/s"
            self.out.info(escape(f"{self.description}: {frames_done(self.done, self.total)} frames, {shown}{left}"))
