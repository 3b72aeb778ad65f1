"""`cvae encode`: files, or a whole dataset through a manifest."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterable, List, Optional

import typer
from rich.markup import escape

from ..errors import CvaeError
from ..outputs import check_suffix, expand, name_outputs
from .app import command
from .jobs import load_engine, report, show_cuts, triage
from .options import (AllowPartial, BatchSize, Chunk, Compile, Cut, Device, DryRun, Dtype, Fast, Fps, Frames,
                      MaxSide, MemoryBudget, Mode, Norm, OutDir, OutFile, Overwrite, Quiet, Size, Tile, Weights,
                      check_placement, selection)
from .output import Output

if TYPE_CHECKING:
    from ..dataset import Layout
    from ..pipeline import Selection


@command
def encode(
    inputs: Annotated[Optional[List[str]], typer.Argument(help="Input files (globs allowed); none with --manifest.",
                                                          show_default=False)] = None,
    output: OutFile = None,
    out_dir: OutDir = None,
    manifest: Annotated[Optional[Path], typer.Option(
        "--manifest", help="A dataset: .txt (a path a line), .csv or .jsonl (`path` plus optional `start`, `end`, "
                           "`fps`, `size`, `output`), paths relative to the manifest's folder. Outputs mirror them "
                           "under --out-dir; complete ones are skipped (resumable); failures go to "
                           "failures.jsonl, totals to summary.json. Under torchrun, ranks share the clips.")] = None,
    shards: Annotated[bool, typer.Option("--shards", help="With --manifest: WebDataset tar shards under --out-dir "
                                                          "(KEY.safetensors + KEY.json a sample, an index.jsonl) "
                                                          "instead of a file a sample.")] = False,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", help="Samples per shard, at most "
                                                                           "(default 1000).")] = None,
    clip_frames: Annotated[Optional[int], typer.Option("--clip-frames", help="With --manifest: cut each video into "
                                                                             "clips of N = 1 + 4k frames (after "
                                                                             "--fps); a shorter tail is left out.")] = None,
    clip_stride: Annotated[Optional[int], typer.Option("--clip-stride", help="Frames from one clip's start to the "
                                                                             "next (default --clip-frames).")] = None,
    buckets: Annotated[Optional[str], typer.Option("--buckets", help="With --manifest: sizes WxH,WxH,... or a preset "
                                                                     "(256px, 512px, 720p); each sample is resized to "
                                                                     "cover the bucket nearest its aspect ratio and "
                                                                     "centre-cropped.")] = None,
    dry_run: DryRun = False,
    weights: Weights = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    mode: Mode = "auto",
    chunk: Chunk = "auto",
    tile: Tile = "auto",
    memory_budget: MemoryBudget = "auto",
    norm: Norm = None,
    fast: Fast = False,
    compile: Compile = False,
    batch_size: BatchSize = 1,
    frames: Frames = None,
    fps: Fps = None,
    size: Size = None,
    max_side: MaxSide = None,
    sample: Annotated[bool, typer.Option("--sample", help="Store a posterior sample instead of its mean "
                                                          "(the same for any --chunk).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --sample.")] = 0,
    save_logvar: Annotated[bool, typer.Option("--save-logvar", help="Also store the posterior log-variance.")] = False,
    allow_partial: AllowPartial = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Encode videos or images to latent files (.safetensors), named after their inputs.

    Audio and alpha are dropped; --frames counts frames after --fps resampling. Two inputs that
    would write one output (`a.jpg` and `a.png`, or `x/b.jpg` and `y/b.jpg` with --out-dir) are
    refused before any work starts.

    Examples:

    ```
        cvae encode clip.mp4                           # -> clip.safetensors
        cvae encode 'videos/*.mp4' --out-dir latents/ --max-side 512 --fps 24
        cvae encode 'images/*.jpg' --out-dir latents/ --size 512x512 --batch-size 32
        cvae encode photo.png --weights LanguageBind/Open-Sora-Plan-v1.1.0/vae
        cvae encode --manifest clips.csv --out-dir latents/ --dry-run
        torchrun --nproc_per_node 8 -m cvae_cli encode --manifest clips.csv --out-dir latents/
        cvae encode --manifest clips.jsonl --out-dir shards/ --shards --clip-frames 17 --buckets 256px
    ```
    """
    out = Output(quiet)
    select = selection(frames, fps, size, max_side, allow_partial)
    cut = Cut.parse(mode, chunk, tile, memory_budget)
    check_placement(device, dtype, out)
    seed_or_none = seed if sample else None
    layout = dataset_layout(manifest, output, shards, shard_size, clip_frames, clip_stride, buckets, size, max_side)
    if manifest is not None:
        if inputs or output is not None or out_dir is None:
            raise CvaeError("--manifest takes no input files and no -o; it needs --out-dir")
        return encode_manifest(out, manifest, out_dir, dry_run, select, cut, weights, device, dtype, norm, fast,
                               compile, seed_or_none, save_logvar, overwrite, batch_size, layout)
    if not inputs:
        raise CvaeError("give input files, or --manifest")
    if output is not None:
        check_suffix(output, [".safetensors"], "latents")
    jobs = name_outputs(expand(inputs), output, out_dir, lambda src: src.stem + ".safetensors")
    todo = triage(out, jobs, overwrite, dry_run)
    if dry_run:
        if todo.pending:
            from .. import media

            engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut, direction="encode")
            todo.failed += show_cuts(out, engine, todo.pending, lambda src: select.model_shape(media.probe(src)))
        raise typer.Exit(1 if todo.failed else 0)
    outcomes: Iterable = ()
    if todo.pending:
        from ..pipeline import encode_many

        engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut, direction="encode")
        outcomes = encode_many(engine.model, [(src, dst, select) for src, dst in todo.pending], engine.options,
                               batch_size=batch_size, seed=seed_or_none, save_logvar=save_logvar,
                               progress=lambda name, total: out.progress(f"encoding {name}", total), note=out.warn)
    report(out, len(jobs), todo, outcomes)


def dataset_layout(manifest: Path | None, output: Path | None, shards: bool, shard_size: int | None,
                   clip_frames: int | None, clip_stride: int | None, buckets: str | None, size: str | None,
                   max_side: int | None) -> Layout:
    """The dataset options (--shards, --shard-size, --clip-frames, --clip-stride, --buckets) as one
    object; each needs --manifest, and --shards no -o."""
    from ..dataset import Layout, Sharding
    from ..samples import Cutting, parse_buckets

    if shards and output is not None:
        raise CvaeError("--shards writes shards under --out-dir: it takes no -o")
    if shard_size is not None and not shards:
        raise CvaeError("--shard-size needs --shards")
    given = [name for name, v in (("--shards", shards), ("--clip-frames", clip_frames),
                                  ("--clip-stride", clip_stride), ("--buckets", buckets)) if v]
    if given and manifest is None:
        raise CvaeError(f"{given[0]} needs --manifest")
    if buckets is not None and (size or max_side):
        raise CvaeError("--buckets chooses each sample's size: drop --size and --max-side")
    cutting = Cutting(clip_frames, clip_stride, None if buckets is None else parse_buckets(buckets))
    return Layout(cutting, Sharding(1000 if shard_size is None else shard_size) if shards else None)


def encode_manifest(out: Output, manifest: Path, out_dir: Path, dry_run: bool, select: Selection, cut: Cut,
                    weights: str, device: str, dtype: str, norm: str | None, fast: bool, compile: bool,
                    seed: int | None, save_logvar: bool, overwrite: bool, batch_size: int, layout: Layout) -> None:
    """`encode --manifest`: one process, or this rank's share under torchrun (see `dataset`)."""
    from .. import dataset
    from ..distributed import Dist

    clips = dataset.read_manifest(manifest)
    dist = Dist.from_env()
    if dry_run:
        with dist.session(dist.device(device)):
            plan = dataset.prepare(clips, out_dir, dist, cutting=layout.cutting, select=select,
                                   sharding=layout.sharding, overwrite=overwrite)
            if dist.rank == 0:
                for line in plan.lines():
                    typer.echo(line)
        raise typer.Exit(1 if plan.missing() else 0)  # as a plain --dry-run: a missing input fails
    with dist.session(dist.device(device)):
        engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut, dist.local_rank, "encode")
        # one process: a bar (or a line every few seconds) per clip, and the per-clip lines; under
        # torchrun the per-clip lines only, prefixed with the rank, each written whole so that
        # processes never interleave mid-line
        if dist.world == 1:
            note = lambda m: out.info(escape(m))  # noqa: E731
            progress = lambda name, total: out.progress(f"encoding {name}", total)  # noqa: E731
        else:
            note, progress = dataset.line_writer(dist.rank, dist.world), None
        note = (lambda m: None) if out.quiet else note
        summary = dataset.run_manifest(engine.model, clips, out_dir, engine.options, select, dist=dist, seed=seed,
                                       save_logvar=save_logvar, overwrite=overwrite, batch_size=batch_size,
                                       cutting=layout.cutting, sharding=layout.sharding, note=note, progress=progress)
    if dist.rank == 0:
        out.info(escape(f"{summary.line()} -> {out_dir / 'summary.json'}"))
        if summary.failed:
            out.error(f"{summary.failed} clip(s) failed: see {out_dir / 'failures.jsonl'}")
            raise typer.Exit(1)  # rank 0 speaks for the run; the others exit 0
