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


def load_weights(weights: str | None, device, dtype, norm: str | None, fast: bool = False, compile: bool = False,
                 out: Output | None = None) -> CausalVAE:
    """The model, on its device in its dtype, with the speed levers asked for. No --weights: the SD
    VAE `cvae inflate` made, else the built-in small model (said in one line)."""
    from ..checkpoints import default_weights, load_model

    if weights is None:
        path, builtin = default_weights()
        if builtin:
            (out or Output()).info("note: using the built-in small model (cvae-small, trained on a CPU); "
                                   "`cvae inflate` makes the better Stable Diffusion one")
        weights = str(path)
    model = load_model(weights, norm=norm, device=device, dtype=dtype)
    if fast or compile:
        from ..accel import speed_up

        speed_up(model, fast=fast, compile=compile)
    return model



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
    """`direction` (encode, decode or reconstruct) says whose peak the budget must hold."""
    from ..budget import Budget, Policy, default_budget
    from ..device import resolve
    from ..stream import exact_streaming

    dev, dt = resolve(device, dtype, local_rank)
    if fast and dev.type == "cpu":  # its levers are GPU ones: on a CPU the fused norm recompiles per shape
        out.warn("--fast does nothing on the CPU (fused GroupNorm+SiLU and cuDNN autotuning are GPU levers; "
                 "on a CPU the fused norm is compiled anew for each shape and runs slower)")
        fast = False
    model = load_weights(weights, dev, dt, norm, fast, compile, out)
    if cut.mode == "stream" and not exact_streaming(model.config):
        out.warn("--mode stream only approximates this model (its norm or attention spans the whole clip); "
                 "--mode auto cuts it as Open-Sora-Plan does")
    if cut.budget is not None:
        budget = Budget(cut.budget, direction, dev.type == "cuda")
    else:  # unknown (not Linux, not CUDA): no limit, the largest cut
        budget = default_budget(dev, model, direction) or Budget(2**62, direction, dev.type == "cuda", "unknown")
    policy = Policy(model.config, dt, model.levers, budget, cut.mode, cut.chunk, cut.tile, warn=out.warn)
    interrupt.check()  # loading takes a while: a Ctrl-C during it stops here
    return Engine(model, cut, policy)


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
    of memory; a failure of one input is its outcome (`pipeline.per_input`), any other failure
    ends the run."""
    from ..pipeline import attempt

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
