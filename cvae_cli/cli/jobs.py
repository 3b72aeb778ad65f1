"""How the file commands run: their jobs sorted before any weights are loaded, the model loaded
once, each input run through the Tokenizer, and each outcome reported as it comes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import typer
from rich.markup import escape

from ..errors import CvaeError, describe
from .options import ModelOptions
from .output import Output, count

if TYPE_CHECKING:
    from ..convert import ProgressFactory
    from ..tokenizer import Tokenizer

Job = tuple[Path, Path]  # (input, output)
Shape = tuple[int, int, bool, "int | None"]  # (width, height, is an image, frames): what a cut depends on
VERBS = {"encode": "encoding", "decode": "decoding", "reconstruct": "reconstructing"}


@dataclass
class Work:
    """One file command's jobs, as `run_files` needs them. `direction` (encode, decode,
    reconstruct) names whose peak the memory budget holds; `shape(src)` is what --dry-run shows
    the cut of; `run(tokenizer, pending, progress)` yields (index in pending, outcome)."""

    direction: str
    jobs: list[Job]
    shape: Callable[[Path], Shape]
    run: Callable[[Tokenizer, list[Job], ProgressFactory], Iterable[tuple[int, object]]]
    refused: list[Path] = field(default_factory=list)  # inputs that failed before any job (unreadable)
    norm: str | None = None  # the GroupNorm to run where --norm is not given (decode: the latents')
    on_result: Callable[[Path, object], None] | None = None


def run_files(out: Output, work: Work, model: ModelOptions, overwrite: bool, dry_run: bool = False) -> None:
    """Sort the jobs (`triage`), load the model once if any is left, and run them (or, with
    `dry_run`, show each one's cut); exit 1 if any input failed."""
    todo = triage(out, work.jobs, overwrite, dry_run, failed=work.refused)
    outcomes: Iterable = ()
    if todo.pending:
        tok = model.load(out, work.direction, norm=work.norm)
        if dry_run:
            todo.failed += show_cuts(out, tok, todo.pending, work.shape)
        else:
            verb = VERBS[work.direction]
            outcomes = work.run(tok, todo.pending, lambda name, total: out.progress(f"{verb} {name}", total))
    if dry_run:
        raise typer.Exit(1 if todo.failed else 0)
    report(out, len(work.jobs) + len(work.refused), todo, outcomes, work.on_result)


def show_cuts(out: Output, tok: Tokenizer, pending: list[Job], shape: Callable[[Path], Shape]) -> list[Path]:
    """--dry-run: the cut each input gets and its counted peak, or why it will not fit (those
    inputs are returned)."""
    failed = []
    for src, _ in pending:
        try:
            width, height, image, frames = shape(src)
            choice = tok.policy.choice(width, height, image, frames)
            out.info(escape(f"{src}: {width}x{height}, {choice.describe()}"))
        except CvaeError as e:
            out.error(f"{src}: {e}")
            failed.append(src)
    return failed


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
