"""`cvae train` and `cvae plot`."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..errors import CvaeError
from ..outputs import check_suffix
from .app import command
from .options import Device, Overwrite, Quiet
from .output import Output


@command
def train(
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoint.pt, loss.csv, loss.png, samples-STEP.png, "
                                                    "final.safetensors. Run the same command again to resume.")],
    data: Annotated[List[str], typer.Option("--data", help="Training media: folders, globs, files, or manifests "
                                                           "(.txt/.csv/.jsonl as for `encode --manifest`). Repeatable.")],
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="Start from these weights (a cvae "
                                                   ".safetensors, an Open-Sora-Plan folder or hub id).")] = None,
    inflate: Annotated[Optional[str], typer.Option("--inflate", help="Start from this SD image VAE (file or hub id), "
                                                   "inflated with --init/--arch/--norm as `cvae inflate` does.")] = None,
    init: Annotated[str, typer.Option("--init", help="With --inflate: tail, center, average or random.")] = "tail",
    arch: Annotated[str, typer.Option("--arch", help="With --inflate: v1.0.0, v1.1.0, or a JSON layout file.")] = "v1.0.0",
    norm: Annotated[str, typer.Option("--norm", help="With --inflate: frame or clip.")] = "frame",
    config: Annotated[Optional[str], typer.Option("--config", help="Start from scratch: image (SD's all-2-D image VAE), "
                                                  "v1.0.0, v1.1.0, or a JSON file of config fields (\"base\": one of "
                                                  "those names).")] = None,
    val: Annotated[Optional[List[str]], typer.Option("--val", help="Held-out media scored every --val-every steps "
                                                     "(one centre-cropped sample per file). Repeatable.")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimiser steps in all.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Samples per step, per process.")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW; linear warm-up, cosine to lr/10).")] = 1e-4,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Warm-up steps.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random draw: data, crops, noise.")] = 0,
    frames: Annotated[int, typer.Option("--frames", help="Frames per clip, 1 + 4k (1: images only).")] = 17,
    size: Annotated[int, typer.Option("--size", help="Crop side in pixels, after a random rescale.")] = 64,
    stride: Annotated[int, typer.Option("--stride", min=1, help="Take every N-th frame of a video.")] = 1,
    image_ratio: Annotated[float, typer.Option("--image-ratio", help="Share of steps trained on single images.")] = 0.0,
    photo_motion: Annotated[float, typer.Option("--photo-motion", help="Share of clips made as pans and zooms over "
                                                "photos (real pixels, made motion).")] = 0.0,
    kl_weight: Annotated[float, typer.Option("--kl-weight", help="KL weight (Open-Sora-Plan's scale).")] = 1e-6,
    lpips: Annotated[Optional[List[str]], typer.Option("--lpips", help="LPIPS weights, local files: lpips' vgg.pth "
                                                       "and torchvision's VGG16 weights. Off without.")] = None,
    disc_start: Annotated[Optional[int], typer.Option("--disc-start", help="Add a 3-D patch discriminator (hinge "
                                                      "loss, adaptive weight) from this step on.")] = None,
    disc_weight: Annotated[float, typer.Option("--disc-weight", help="Scale of the adaptive GAN weight.")] = 0.5,
    ema: Annotated[Optional[float], typer.Option("--ema", help="Keep an EMA of the weights with this decay "
                                                 "(e.g. 0.999); validation and final.safetensors use it.")] = None,
    trainable: Annotated[str, typer.Option("--train", help="Which weights learn: all, temporal (layers that span "
                                           "frames) or decoder.")] = "all",
    checkpointing: Annotated[bool, typer.Option("--checkpointing", help="Recompute block activations in the "
                                                "backward pass: less memory, about 1/3 more compute.")] = False,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Checkpoint every N steps.")] = 500,
    val_every: Annotated[int, typer.Option("--val-every", min=1, help="Validate every N steps.")] = 500,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="A loss.csv row every N steps.")] = 10,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes.")] = 2,
    device: Device = "auto",
    quiet: Quiet = False,
):
    """Train a causal VAE: fine-tune released or inflated weights, or train from scratch.

    L1 + KL (+ LPIPS, + GAN) on random crops of videos, images and camera paths over photos; bf16
    autocast on GPU, fp32 on the CPU. Resumable: run the same command again. Under torchrun it is
    distributed data parallel; only rank 0 writes and prints.

    Examples:

    ```
        cvae train --inflate sd-vae.safetensors --init tail --data clips/ --data photos/ --photo-motion 0.3 --out runs/tail
        cvae train --config image --frames 1 --size 128 --data photos/ --val held-out/ --out runs/image-vae
        cvae train --weights LanguageBind/Open-Sora-Plan-v1.1.0/vae --train temporal --data clips.csv --out runs/ft
        torchrun --nproc_per_node 8 -m cvae_cli train --weights w.safetensors --data clips/ --out runs/big -b 4
    ```
    """
    from ..distributed import Dist
    from ..train import Report, Start, TrainOptions, train as run_training

    out_ = Output(quiet)
    dist = Dist.from_env()
    start = Start(weights=weights, inflate=inflate, init=init, arch=arch, norm=norm, config=config)
    opts = TrainOptions(out=out, data=data, val=val or [], steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                        ema=ema, seed=seed, frames=frames, size=size, stride=stride, image_ratio=image_ratio,
                        photo_motion=photo_motion, kl_weight=kl_weight, lpips=lpips or [], disc_start=disc_start,
                        disc_weight=disc_weight, train=trainable, checkpointing=checkpointing,
                        save_every=save_every, val_every=val_every, log_every=log_every, workers=workers,
                        device=device)
    speak = dist.rank == 0 and not quiet
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if speak:
            out_.info("[yellow]note[/] matplotlib is not installed: no loss.png (pip install 'cvae-cli[train]')")
    with training_progress(out_, steps, enabled=speak) as report:
        if dist.rank != 0:
            report = Report()
        final = run_training(opts, start, dist, report)
    if speak:
        out_.info(f"[green]wrote[/] {escape(str(final))}")


@contextmanager
def training_progress(out: Output, steps: int, enabled: bool):
    """A live line (step/total, loss, samples/s, ETA) on a terminal; elsewhere a line per loss.csv row."""
    from rich.progress import TimeRemainingColumn

    from ..train import Report

    if not enabled:
        yield Report()
        return
    if not out.console.is_terminal:
        def row(r):
            extra = f", val PSNR {r['val_psnr']:.2f} dB" if r.get("val_psnr") is not None else ""
            out.info(f"step {r['step']}/{steps}: loss {r.get('loss', float('nan')):.4f}, "
                     f"{r['samples_per_s']:.1f} samples/s{extra}")
        yield Report(note=lambda m: out.info(escape(m)), row=row)
        return
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=out.console, transient=False) as bar:
        task = bar.add_task("train", total=steps, status="")

        def row(r):
            extra = f" val {r['val_psnr']:.2f} dB" if r.get("val_psnr") is not None else ""
            bar.update(task, status=f"loss {r.get('loss', float('nan')):.4f} {r['samples_per_s']:.1f} samples/s{extra}")

        yield Report(note=lambda m: bar.console.print(escape(m)), row=row,
                     advance=lambda step, total: bar.update(task, completed=step))


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
