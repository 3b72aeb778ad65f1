"""`cvae train` and `cvae plot`."""
from __future__ import annotations

import dataclasses
import inspect
import time
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..errors import CvaeError
from ..outputs import check_suffix
from .app import command
from .options import Overwrite, Quiet
from .output import Output


def declared_parameters(*groups) -> list[inspect.Parameter]:
    """Typer parameters made from options declared as dataclass fields (`train.option`): their flag,
    help, bounds, type and default come from the declaration, so each option is written once."""
    from ..train import option_fields

    params = []
    for group in groups:
        for d in option_fields(group):
            md, f = d.field.metadata, d.field
            kind, optional = d.type, False
            if typing.get_origin(kind) in (typing.Union, types.UnionType):
                (kind,), optional = [a for a in typing.get_args(kind) if a is not type(None)], True
            if typing.get_origin(kind) is list:
                kind, optional = List[typing.get_args(kind)[0]], True
            info = typer.Option(d.flag, *([md["short"]] if md.get("short") else []), help=md["help"],
                                min=md.get("min"), show_default=f.default not in (None, dataclasses.MISSING))
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = (inspect.Parameter.empty if required else
                       None if f.default_factory is not dataclasses.MISSING else f.default)
            params.append(inspect.Parameter(d.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[Optional[kind] if optional else kind, info]))
    names = [p.name for p in params]
    assert len(set(names)) == len(names), "two declared options share a name"
    return params


def train(quiet: bool = False, **values) -> None:
    """Train a causal VAE: fine-tune released or inflated weights, or train from scratch.

    L1 + KL (+ LPIPS, + GAN) on random crops of videos, images and camera paths over photos; bf16
    autocast on GPU, fp32 on the CPU. Resumable: run the same command again. Under torchrun it is
    distributed data parallel; only rank 0 writes and prints.

    Examples:

    ```
        cvae train --inflate sd-vae.safetensors --init tail --data clips/ --data photos/ --photo-motion 0.3 --out runs/tail
        cvae train --config image --size 128 --data photos/ --val held-out/ --out runs/image-vae
        cvae train --weights LanguageBind/Open-Sora-Plan-v1.1.0/vae --train temporal --data clips.csv --out runs/ft
        torchrun --nproc_per_node 8 -m cvae_cli train --weights w.safetensors --data clips/ --out runs/big -b 4
    ```
    """
    from ..distributed import Dist
    from ..train import Start, TrainOptions, from_flat, train as run_training

    values = {k: [] if v is None and k in ("val", "lpips") else v for k, v in values.items()}
    start, opts = from_flat(Start, values), from_flat(TrainOptions, values)
    out, dist = Output(quiet), Dist.from_env()
    speak = dist.rank == 0 and not quiet
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if speak:
            out.info("[yellow]note[/] matplotlib is not installed: no loss.png (pip install 'cvae-cli[train]')")
    with training_progress(out, enabled=speak) as report:
        final = run_training(opts, start, dist, report)
    if speak:
        out.info(f"[green]wrote[/] {escape(str(final))}")


def _declare(fn):
    from ..train import Start, TrainOptions

    fn.__signature__ = inspect.Signature(declared_parameters(Start, TrainOptions) + [
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Quiet)])
    return fn


train = command(_declare(train))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Pace:
    """Time a step takes and time left, from the steps this process has run (a resumed run's earlier
    steps do not count): known from the first step on, however long a step is."""

    def __init__(self):
        self.t0, self.step0, self.step, self.total = time.monotonic(), 0, 0, 0

    def begin(self, step: int, total: int) -> None:
        self.t0, self.step0, self.step, self.total = time.monotonic(), step, step, total

    def describe(self) -> str:
        done = self.step - self.step0
        if done <= 0:
            return "first step"
        per_step = (time.monotonic() - self.t0) / done
        return f"{_clock(per_step)} a step, {_clock(per_step * (self.total - self.step))} left"


@contextmanager
def training_progress(out: Output, enabled: bool):
    """A live line (step/total, loss, samples/s, time a step, time left) on a terminal; elsewhere a
    line after the first step, at each loss.csv row and at least every minute."""
    from ..train import Report

    if not enabled:
        yield Report()
        return
    pace = Pace()

    def loss_text(r):
        extra = f", val PSNR {r['val_psnr']:.2f} dB" if r.get("val_psnr") is not None else ""
        return f"loss {r.get('loss', float('nan')):.4f}, {r['samples_per_s']:.2f} samples/s{extra}"

    if not out.console.is_terminal:
        last = [time.monotonic()]

        def say(text):
            out.info(escape(f"step {pace.step}/{pace.total}: {text}{', ' if text else ''}{pace.describe()}"))
            last[0] = time.monotonic()

        def advance(step, total):
            first, pace.step = pace.step == pace.step0, step
            if first or time.monotonic() - last[0] >= 60:
                say("")

        yield Report(note=lambda m: out.info(escape(m)), row=lambda r: say(loss_text(r)), begin=pace.begin,
                     advance=advance)
        return
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TextColumn("{task.fields[pace]}"))
    with Progress(*columns, console=out.console, transient=False) as bar:
        task = bar.add_task("train", total=None, status="", pace="")

        def begin(step, total):
            pace.begin(step, total)
            bar.update(task, total=total, completed=step, pace=pace.describe())

        def advance(step, total):
            pace.step = step
            bar.update(task, completed=step, pace=pace.describe())

        yield Report(note=lambda m: bar.console.print(escape(m)), begin=begin, advance=advance,
                     row=lambda r: bar.update(task, status=loss_text(r)))


@command
def plot(
    runs: Annotated[List[Path], typer.Argument(help="`cvae train --out` folders (or their loss.csv).", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Image to write (.png, .svg, .pdf).")],
    column: Annotated[Optional[List[str]], typer.Option("--column", "-c", help="loss.csv columns to plot, a panel "
                                                        "each (default: loss and val_psnr).")] = None,
    label: Annotated[Optional[List[str]], typer.Option("--label", help="Legend names, one per run (default: "
                                                       "folder names).")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Figure title.")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Overlay the loss curves of training runs (needs matplotlib: pip install 'cvae-cli[train]').

    Examples:

    ```
        cvae plot runs/tail runs/center -o tail-vs-center.png
        cvae plot runs/* -c l1 -c kl -o terms.png --title "fine-tuning"
    ```
    """
    from ..plot import plot_runs

    out = Output(quiet)
    check_suffix(output, [".png", ".svg", ".pdf"], "figures")
    if output.exists() and not overwrite:
        raise CvaeError(f"{output} exists: pass --overwrite to replace it")
    plot_runs(runs, output, tuple(column or ("loss", "val_psnr")), label, title)
    out.info(f"[green]wrote[/] {escape(str(output))}")
