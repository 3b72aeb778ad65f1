"""`cvae encode`: files, or a whole dataset through a manifest."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, List, Optional

import typer
from rich.markup import escape

from ..errors import CvaeError
from ..outputs import check_suffix, expand, latent_name, name_outputs
from .app import command
from .jobs import Work, run_files
from .options import BatchSize, DryRun, ModelOptions, Outputs, Quiet, SelectOptions, grouped
from .output import Output

if TYPE_CHECKING:
    from ..convert import ProgressFactory
    from ..dataset import Layout

MaybeInputs = Annotated[Optional[List[str]], typer.Argument(help="Input files (globs allowed); none with --manifest.",
                                                            show_default=False)]
Manifest = Annotated[Optional[Path], typer.Option(
    "--manifest", help="A dataset: .txt (a path a line), .csv or .jsonl (`path` plus optional `start`, `end`, "
                       "`fps`, `size`, `output`), paths relative to the manifest's folder. Outputs mirror them "
                       "under --out-dir; complete ones are skipped (resumable); failures go to "
                       "failures.jsonl, totals to summary.json. Under torchrun, ranks share the clips.")]
Shards = Annotated[bool, typer.Option("--shards", help="With --manifest: WebDataset tar shards under --out-dir "
                                                       "(KEY.safetensors + KEY.json a sample, an index.jsonl) "
                                                       "instead of a file a sample.")]
ShardSize = Annotated[Optional[int], typer.Option("--shard-size", help="Samples per shard, at most (default 1000).")]
ClipFrames = Annotated[Optional[int], typer.Option("--clip-frames", help="With --manifest: cut each video into clips "
                                                                         "of N = 1 + 4k frames (after --fps); a "
                                                                         "shorter tail is left out.")]
ClipStride = Annotated[Optional[int], typer.Option("--clip-stride", help="Frames from one clip's start to the next "
                                                                         "(default --clip-frames).")]
Buckets = Annotated[Optional[str], typer.Option("--buckets", help="With --manifest: sizes WxH,WxH,... or a preset "
                                                                  "(256px, 512px, 720p); each sample is resized to "
                                                                  "cover the bucket nearest its aspect ratio and "
                                                                  "centre-cropped.")]
Sample = Annotated[bool, typer.Option("--sample", help="Store a posterior sample instead of its mean "
                                                       "(the same for any --chunk).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for --sample (default 0).", show_default=False)]
SaveLogvar = Annotated[bool, typer.Option("--save-logvar", help="Also store the posterior log-variance.")]


@dataclass(frozen=True)
class DatasetOptions:
    """A dataset through a manifest, and how its samples are cut and stored."""

    PANEL = "Dataset"

    manifest: Manifest = None
    shards: Shards = False
    shard_size: ShardSize = None
    clip_frames: ClipFrames = None
    clip_stride: ClipStride = None
    buckets: Buckets = None

    def layout(self, files: Outputs, select: SelectOptions) -> Layout:
        """The dataset options as one object; each needs --manifest, and --shards no -o."""
        from ..dataset import Layout, Sharding
        from ..samples import Cutting, parse_buckets

        if self.shards and files.output is not None:
            raise CvaeError("--shards writes shards under --out-dir: it takes no -o")
        if self.shard_size is not None and not self.shards:
            raise CvaeError("--shard-size needs --shards")
        given = [name for name, v in (("--shards", self.shards), ("--clip-frames", self.clip_frames),
                                      ("--clip-stride", self.clip_stride), ("--buckets", self.buckets)) if v]
        if given and self.manifest is None:
            raise CvaeError(f"{given[0]} needs --manifest")
        if self.buckets is not None and (select.size or select.max_side):
            raise CvaeError("--buckets chooses each sample's size: drop --size and --max-side")
        cutting = Cutting(self.clip_frames, self.clip_stride,
                          None if self.buckets is None else parse_buckets(self.buckets))
        return Layout(cutting, Sharding(1000 if self.shard_size is None else self.shard_size) if self.shards else None)


@dataclass(frozen=True)
class LatentOptions:
    """What each latent file stores, and how many inputs run together."""

    PANEL = "Latents"

    sample: Sample = False
    seed: Seed = None
    save_logvar: SaveLogvar = False
    batch_size: BatchSize = 1

    def __post_init__(self):
        if self.seed is not None and not self.sample:  # refused, not ignored
            raise CvaeError("--seed is the seed of --sample: add --sample to store a sample, or drop --seed")

    @property
    def sample_seed(self) -> int | None:
        """The seed of a posterior sample, or None to store the mean."""
        return (self.seed or 0) if self.sample else None


@command
@grouped
def encode(inputs: MaybeInputs = None, files: Outputs = None, dataset: DatasetOptions = None,
           model: ModelOptions = None, select: SelectOptions = None, latent: LatentOptions = None,
           dry_run: DryRun = False, quiet: Quiet = False):
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
    layout = dataset.layout(files, select)
    if dataset.manifest is not None:
        if inputs or files.output is not None or files.out_dir is None:
            raise CvaeError("--manifest takes no input files and no -o; it needs --out-dir")
        return encode_manifest(out, dataset.manifest, files, layout, model, select, latent, dry_run)
    if not inputs:
        raise CvaeError("give input files, or --manifest")
    run_files(out, encode_work(out, expand(inputs), files, select, latent), model, files.overwrite, dry_run)


def encode_work(out: Output, paths: list[Path], files: Outputs, select: SelectOptions, latent: LatentOptions) -> Work:
    from .. import media

    if files.output is not None:
        check_suffix(files.output, [".safetensors"], "latents")
    selection = select.selection()
    return Work("encode", name_outputs(paths, files.output, files.out_dir, latent_name),
                lambda src: selection.model_shape(media.probe(src)),
                lambda tok, pending, progress: tok.encode_many(
                    [(src, dst, selection) for src, dst in pending], batch_size=latent.batch_size,
                    seed=latent.sample_seed, save_logvar=latent.save_logvar, progress=progress, note=out.warn))


def encode_manifest(out: Output, manifest: Path, files: Outputs, layout: Layout, model: ModelOptions,
                    select: SelectOptions, latent: LatentOptions, dry_run: bool) -> None:
    """`encode --manifest`: one process, or this rank's share under torchrun (see `dataset`)."""
    from .. import dataset
    from ..distributed import Dist

    clips, dist = dataset.read_manifest(manifest), Dist.from_env()
    job = dataset.DatasetJob(clips, files.out_dir, select.selection(), layout.cutting, layout.sharding,
                             seed=latent.sample_seed, save_logvar=latent.save_logvar, overwrite=files.overwrite,
                             batch_size=latent.batch_size)
    with dist.session(dist.device(model.device)):
        if dry_run:
            plan = job.plan(dist)
            if dist.rank == 0:
                for line in plan.lines():
                    typer.echo(line)
            raise typer.Exit(1 if plan.missing() else 0)  # as a plain --dry-run: a missing input fails
        tok = model.load(out, "encode", local_rank=dist.local_rank)
        note, progress = manifest_progress(out, dist)
        summary = job.run(tok, dist, note=note, progress=progress)
    if dist.rank == 0:
        out.info(escape(f"{summary.line()} -> {files.out_dir / 'summary.json'}"))
        if summary.failed:
            out.error(f"{summary.failed} clip(s) failed: see {files.out_dir / 'failures.jsonl'}")
            raise typer.Exit(1)  # rank 0 speaks for the run; the others exit 0


def manifest_progress(out: Output, dist) -> tuple[Callable[[str], None], ProgressFactory | None]:
    """One process: a bar (or a line every few seconds) per clip, and the per-clip lines; under
    torchrun the per-clip lines only, prefixed with the rank, each written whole so that processes
    never interleave mid-line."""
    from ..dataset import line_writer

    if out.quiet:
        return (lambda m: None), None
    if dist.world == 1:
        return (lambda m: out.info(escape(m))), (lambda name, total: out.progress(f"encoding {name}", total))
    return line_writer(dist.rank, dist.world), None
