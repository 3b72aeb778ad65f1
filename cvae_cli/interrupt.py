"""Stopping a run cleanly: Ctrl-C, SIGTERM, or another rank's failure.

A signal only *asks* to stop: `request` records why, and the work stops at its next safe point
(between chunks, tiles and inputs), where `check` raises `Interrupted`. The exception unwinds
through the writers' cleanup, so no temporary file outlives the run and no half-written output
appears. A second Ctrl-C or SIGTERM interrupts at once.

`Interrupted` is a `KeyboardInterrupt`: no `except Exception` in the pipeline swallows it, so one
input's failure handler never mistakes it for that input's error.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_lock = threading.Lock()
_pending: "Interrupted | None" = None
_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report them


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop; `status` is the exit status the process should end with, and
    `outcome` what the stop left behind (the second half of the one line the user sees)."""

    def __init__(self, reason: str, status: int = 130, outcome: str = "no partial output was kept"):
        super().__init__(reason)
        self.reason, self.status, self.outcome = reason, status, outcome

    def __str__(self) -> str:
        return self.reason


def request(reason: str, status: int = 130) -> None:
    """Ask the run to stop at its next safe point (the first request wins)."""
    global _pending
    with _lock:
        if _pending is None:
            _pending = Interrupted(reason, status)


def pending() -> Interrupted | None:
    return _pending


def check() -> None:
    """Raise `Interrupted` if a stop was requested: call this at every safe point."""
    if _pending is not None:
        raise _pending


def clear() -> None:
    global _pending
    with _lock:
        _pending = None


@contextlib.contextmanager
def signals_stop_at_safe_points() -> Iterator[None]:
    """While inside: SIGINT and SIGTERM request a stop (see `request`); a second one raises at once.
    Only the main thread can own signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _pending is not None:  # asked twice: stop now
            raise Interrupted(f"interrupted ({name}, twice)", _STATUS.get(signum, 130))
        request(f"interrupted ({name})", _STATUS.get(signum, 130))

    previous = {s: signal.signal(s, handler) for s in _STATUS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        clear()
