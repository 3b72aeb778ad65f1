"""What the file commands share: loading the model, sorting jobs before any weights are loaded,
running them one input at a time, and reporting each outcome."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterable, Iterator

import typer
from rich.markup import escape

from .. import interrupt
from ..errors import CvaeError, describe
from .options import Cut
from .output import Output, count

if TYPE_CHECKING:
    from ..budget import Policy
    from ..model import CausalVAE


@dataclass
class Engine:
    """What encode, decode and reconstruct share: the loaded model and how each input is cut
    (`options`, a `budget.Policy`: the cut asked for, or the largest that fits the memory budget)."""

    model: CausalVAE
    cut: Cut
    options: Policy

    @property
    def device(self):
        return next(self.model.parameters()).device


def load_engine(out: Output, weights: str | None, device: str, dtype: str, norm: str | None, fast: bool, compile: bool,
                cut: Cut, local_rank: int | None = None, direction: str = "reconstruct") -> Engine:
    """The model through `Tokenizer.load` (the one loading policy: default weights, device, dtype,
    speed levers, the budget's cut), with what it chose or warns of said. `direction` (encode,
    decode or reconstruct) says whose peak the budget must hold."""
    from ..tokenizer import Tokenizer

    tok = Tokenizer.load(weights, device, dtype, norm, fast, compile, cut.mode, cut.chunk, cut.tile, cut.budget,
                         local_rank=local_rank, direction=direction, on_warning=out.warn)
    for note in tok.notes:
        out.info(escape(f"note: {note}"))
    interrupt.check()  # loading takes a while: a Ctrl-C during it stops here
    return Engine(tok.model, cut, tok.policy)


def show_cuts(out: Output, engine: Engine, pending: list[Job],
              size: Callable[[Path], tuple[int, int, bool, int | None]]) -> list[Path]:
    """--dry-run: the cut each input gets and its counted peak, or why it will not fit (those
    inputs are returned)."""
    failed = []
    for src, _ in pending:
        try:
            width, height, image, frames = size(src)
            choice = engine.options.choice(width, height, image, frames)
            out.info(escape(f"{src}: {width}x{height}, {choice.describe()}"))
        except CvaeError as e:
            out.error(f"{src}: {e}")
            failed.append(src)
    return failed



Job = tuple[Path, Path]  # (input, output)


@dataclass
class Triage:
    """Jobs sorted before any weights are loaded: to run, skipped (output exists), failed already."""

    pending: list[Job]
    skipped: int
    failed: list[Path]


def triage(out: Output, jobs: list[Job], overwrite: bool, dry_run: bool = False,
           failed: list[Path] | None = None) -> Triage:
    """Report missing inputs and outputs that cannot be written now; skip existing outputs unless
    `overwrite`; list the rest."""
    result = Triage([], 0, list(failed or []))
    for src, dst in jobs:
        if not src.is_file():
            result.failed.append(src)
            out.error(f"no such file: {src}" if not src.exists() else f"{src} is not a file")
        elif dst.exists() and not overwrite:
            result.skipped += 1
            out.info(escape(f"skip {dst} exists (use --overwrite)"))
        elif (unwritable := _unwritable(dst)) is not None:
            result.failed.append(src)
            out.error(unwritable)
        else:
            result.pending.append((src, dst))
            if dry_run:  # the plan is the command's output: stdout, as `encode --manifest --dry-run` prints it
                typer.echo(f"{src} -> {dst}")
    return result


def _unwritable(dst: Path) -> str | None:
    from ..outputs import check_writable

    try:
        check_writable(dst)
    except CvaeError as e:
        return str(e)
    return None


def report(out: Output, inputs: int, jobs: Triage, outcomes: Iterable[tuple[int, object]],
           on_result: Callable[[Path, object], None] | None = None) -> None:
    """Print each outcome of the pending jobs as it comes, then a summary of many inputs; exit 1
    if any failed."""
    done, failures = 0, list(jobs.failed)
    for k, outcome in outcomes:
        src, dst = jobs.pending[k]
        if isinstance(outcome, BaseException):
            message = describe(outcome)
            out.error(message if inputs == 1 or str(src) in message else f"{src}: {message}")
            failures.append(src)
            continue
        done += 1
        if on_result:
            on_result(src, outcome)
        out.info(escape(f"wrote {dst} ({count(outcome.frames, 'frame')})"))
    if inputs > 1:
        out.info(f"{done} done, {jobs.skipped} skipped, {len(failures)} failed")
    if failures:
        if inputs > 1:
            for src in failures:
                out.error(escape(f"failed: {src}"))
        raise typer.Exit(1)


def one_by_one(out: Output, engine: Engine, pending: list[Job], verb: str, open_input: Callable[[Path], ContextManager],
               total: Callable[[object], int | None],
               run: Callable[[object, Path, object, Callable[[int], None]], object]) -> Iterator[tuple[int, object]]:
    """(index, outcome) of each job, in order, its input opened once (`open_input`) and run with the
    engine's cut (`run(item, dst, options, advance)`), once more with a smaller cut if it runs out
    of memory; a failure of one input is its outcome (`tokenizer.per_input`), any other failure
    ends the run."""
    from ..tokenizer import attempt

    for k, (src, dst) in enumerate(pending):
        interrupt.check()  # between inputs
        try:
            opened = open_input(src)
        except CvaeError as e:
            yield k, e
            continue
        with opened as item, out.progress(f"{verb} {src.name}", total(item)) as advance:
            tries = iter([item, src])  # a retry after running out of memory reads the input afresh
            outcome = attempt(lambda options: [run(next(tries), dst, options, advance)], 1, engine.options, str(src),
                              engine.device, out.warn)[0]
        yield k, outcome
