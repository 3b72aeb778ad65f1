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
    from ..model import CausalVAE
    from ..stream import StreamOptions


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
        from ..accel import Acceleration, prepare

        # channels-last is left out: on an H200 it made encode and decode slower (benchmarks/README.md)
        prepare(model, Acceleration(fused_norm=fast, compile=compile,
                                    cudnn_benchmark=fast and str(device).startswith("cuda")))
    return model



@dataclass
class Engine:
    """What encode, decode and reconstruct share: the loaded model and the cut asked for."""

    model: CausalVAE
    cut: Cut

    def options(self, width: int, height: int, image: bool = False) -> StreamOptions:
        from ..stream import choose_options

        try:
            return choose_options(self.model.config, width, height, self.cut.mode, self.cut.chunk, self.cut.tile, image)
        except ValueError as e:
            raise CvaeError(str(e)) from None


def load_engine(out: Output, weights: str | None, device: str, dtype: str, norm: str | None, fast: bool, compile: bool,
                cut: Cut, local_rank: int | None = None) -> Engine:
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
    interrupt.check()  # loading takes a while: a Ctrl-C during it stops here
    return Engine(model, cut)



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


def one_by_one(out: Output, pending: list[Job], verb: str, open_input: Callable[[Path], ContextManager],
               total: Callable[[object], int | None],
               run: Callable[[object, Path, Callable[[int], None]], object]) -> Iterator[tuple[int, object]]:
    """(index, outcome) of each job, in order, its input opened once (`open_input`); a failure of
    one input is its outcome (`pipeline.per_input`), any other failure ends the run."""
    from ..pipeline import attempt

    for k, (src, dst) in enumerate(pending):
        interrupt.check()  # between inputs
        try:
            opened = open_input(src)
        except CvaeError as e:
            yield k, e
            continue
        with opened as item, out.progress(f"{verb} {src.name}", total(item)) as advance:
            outcome = attempt(lambda: [run(item, dst, advance)], 1)[0]
        yield k, outcome
