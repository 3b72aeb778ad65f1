"""`cvae decode` and `cvae reconstruct`: latents back to videos and images, and the round trip scored."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Iterable, Optional

import typer
from rich.markup import escape

from ..errors import CvaeError
from ..outputs import check_suffix, expand, name_outputs
from .app import command
from .jobs import load_engine, one_by_one, report, show_cuts, triage
from .options import (AllowPartial, Chunk, Compile, Crf, Cut, Device, DryRun, Dtype, Fast, Fps, Frames, Inputs,
                      MaxSide, MemoryBudget, Mode, Norm, OutDir, OutFile, Overwrite, Quiet, Size, Tile, Weights,
                      check_crf, check_placement, selection)
from .output import Output


# what a reconstruction's scores do not see: the writer's own loss (they score the decoded frames)
LOSSY = {".mp4": "H.264", ".mov": "H.264", ".mkv": "H.264", ".webm": "VP9", ".jpg": "JPEG", ".jpeg": "JPEG",
         ".webp": "WebP"}


@command
def decode(
    inputs: Inputs,
    output: OutFile = None,
    out_dir: OutDir = None,
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
    crf: Crf = 18,
    force: Annotated[bool, typer.Option("--force", help="Decode latents made by other weights of the same "
                                                        "architecture anyway.")] = False,
    dry_run: DryRun = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Decode latent files at their original size and frame rate: X.safetensors -> X.decoded.mp4
    (a video's latent, even of one frame, decodes to a video; an image's to X.decoded.png).

    The container and codec follow the output's suffix: .mp4, .mov, .mkv hold H.264 (4:2:0), .webm
    holds VP9. H.264 4:2:0 codes even sides only: an odd width or height is written one repeated
    edge pixel larger, with the true size in a tag that cvae reads back (.webm keeps it exactly).

    Examples:

    ```
        cvae decode clip.safetensors                   # -> clip.decoded.mp4
        cvae decode clip.safetensors -o clip.webm
        cvae decode 'latents/*.safetensors' --out-dir decoded/ --crf 12
    ```
    """
    from ..latents import LatentFile
    from ..pipeline import check_output_kind, decode_file

    out = Output(quiet)
    cut = Cut.parse(mode, chunk, tile, memory_budget)
    check_crf(crf, output)
    check_placement(device, dtype, out)
    paths = expand(inputs)
    latents: dict[Path, LatentFile] = {}
    unreadable = []
    for p in paths:  # opened once: the metadata names the output, the job decodes from it
        if p.is_file():
            try:
                latents[p] = LatentFile.open(p)
            except CvaeError as e:
                out.error(str(e))
                unreadable.append(p)
    kind = {p: ".png" if f.meta.fps is None else ".mp4" for p, f in latents.items()}
    if output is not None and len(latents) == 1:
        check_output_kind(output, image=kind[next(iter(latents))] == ".png")
    readable = [p for p in paths if p not in unreadable]
    jobs = name_outputs(readable, output, out_dir, lambda src: src.stem + ".decoded" + kind.get(src, ".mp4"),
                        unreadable=unreadable)  # a file given as input is never written over, readable or not
    todo = triage(out, jobs, overwrite, dry_run, failed=unreadable)
    if dry_run:
        if todo.pending:
            engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut, direction="decode")
            todo.failed += show_cuts(out, engine, todo.pending, lambda src: (latents[src].meta.width, latents[src].meta.height,
                                                              latents[src].meta.fps is None,
                                                              latents[src].meta.padded_frames))
        raise typer.Exit(1 if todo.failed else 0)
    outcomes: Iterable = ()
    if todo.pending:
        engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut, direction="decode")
        outcomes = one_by_one(out, engine, todo.pending, "decoding", latents.__getitem__,
                              lambda latent: latent.meta.frames,
                              lambda latent, dst, options, advance: decode_file(engine.model, latent, dst, options,
                                                                                crf=crf, force=force, progress=advance))
    report(out, len(paths), todo, outcomes)


@command
def reconstruct(
    inputs: Inputs,
    output: OutFile = None,
    out_dir: OutDir = None,
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
    frames: Frames = None,
    fps: Fps = None,
    size: Size = None,
    max_side: MaxSide = None,
    crf: Crf = 18,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Write input and reconstruction side by side.")] = False,
    metrics_json: Annotated[Optional[Path], typer.Option("--metrics-json", help="Save per-frame PSNR/SSIM here "
                                                          "(null where a value is not a finite number).")] = None,
    no_metrics: Annotated[bool, typer.Option("--no-metrics", help="Skip PSNR/SSIM: only write the "
                                                                  "reconstruction.")] = False,
    allow_partial: AllowPartial = False,
    dry_run: DryRun = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Encode and decode in one pass and score the result (PSNR, SSIM against the input):
    X.mp4 -> X.recon.mp4, an image -> X.recon.png. Audio and alpha are dropped; --frames counts
    frames after --fps resampling. The scores are of the frames as decoded, before the video (or
    JPEG) encoder; the output is written first, and a scoring failure never costs it.

    Examples:

    ```
        cvae reconstruct photo.png                     # writes photo.recon.png, prints PSNR/SSIM
        cvae reconstruct clip.mp4 --side-by-side --metrics-json clip.metrics.json
    ```
    """
    from .. import media
    from ..atomic import atomic_path
    from ..pipeline import reconstruct_file

    out = Output(quiet)
    select = selection(frames, fps, size, max_side, allow_partial)
    cut = Cut.parse(mode, chunk, tile, memory_budget)
    check_crf(crf, output)
    check_placement(device, dtype, out)
    paths = expand(inputs)
    if metrics_json is not None:
        if no_metrics:
            raise CvaeError("--metrics-json and --no-metrics: choose one")
        check_suffix(metrics_json, [".json"], "metrics")
    jobs = name_outputs(paths, output, out_dir,
                        lambda src: src.stem + ".recon" + (".png" if media.is_image(src) else ".mp4"))
    todo = triage(out, jobs, overwrite, dry_run)
    if dry_run:
        if todo.pending:
            engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut, direction="reconstruct")
            todo.failed += show_cuts(out, engine, todo.pending, lambda src: select.model_shape(media.probe(src)))
        raise typer.Exit(1 if todo.failed else 0)
    scores = {}

    def keep_score(src: Path, result) -> None:
        if result.metrics_error:
            out.warn(f"{src.name}: no scores ({result.metrics_error}); the output was written")
        elif result.metrics is not None:
            codec = LOSSY.get(result.output.suffix.lower())
            out.info(escape(f"{src.name}: {result.metrics.line()}" + (f", before {codec} encoding" if codec else "")))
            scores[str(src)] = result.metrics.summary()

    outcomes: Iterable = ()
    if todo.pending:
        engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut, direction="reconstruct")
        outcomes = one_by_one(out, engine, todo.pending, "reconstructing", media.open_media,
                              lambda source: select.expected_frames(source.info),
                              lambda source, dst, options, advance: reconstruct_file(
                                  engine.model, source, dst, options, select, crf=crf,
                                  side_by_side=side_by_side, metrics=not no_metrics, progress=advance))
    try:
        report(out, len(paths), todo, outcomes, on_result=keep_score)
    finally:
        if metrics_json and scores:
            with atomic_path(metrics_json) as tmp:
                tmp.write_text(json.dumps(scores, indent=1, allow_nan=False))
