"""`cvae decode` and `cvae reconstruct`: latents back to videos and images, and the round trip scored."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from ..errors import CvaeError
from ..outputs import check_suffix, decoded_name, expand, name_outputs, recon_name
from .app import command
from .jobs import Work, run_files
from .options import (Crf, DryRun, Inputs, ModelOptions, Outputs, Quiet, SelectOptions, check_crf, grouped)
from .output import Output

if TYPE_CHECKING:
    from ..latents import LatentFile

# what a reconstruction's scores do not see: the writer's own loss (they score the decoded frames)
LOSSY = {".mp4": "H.264", ".mov": "H.264", ".mkv": "H.264", ".webm": "VP9", ".jpg": "JPEG", ".jpeg": "JPEG",
         ".webp": "WebP"}
Force = Annotated[bool, typer.Option("--force", help="Decode latents made by other weights of the same "
                                                     "architecture anyway.")]
SideBySide = Annotated[bool, typer.Option("--side-by-side", help="Write input and reconstruction side by side.")]
MetricsJson = Annotated[Optional[Path], typer.Option("--metrics-json", help="Save per-frame PSNR/SSIM here "
                                                     "(null where a value is not a finite number).")]
NoMetrics = Annotated[bool, typer.Option("--no-metrics", help="Skip PSNR/SSIM: only write the reconstruction.")]


@command
@grouped
def decode(inputs: Inputs, files: Outputs, model: ModelOptions, crf: Crf = 18, force: Force = False,
           dry_run: DryRun = False, quiet: Quiet = False):
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
    check_crf(crf, files.output)
    out = Output(quiet)
    run_files(out, decode_work(out, expand(inputs), files, crf, force), model, files.overwrite, dry_run)


def decode_work(out: Output, paths: list[Path], files: Outputs, crf: int, force: bool) -> Work:
    """The latents opened once (their metadata names the outputs, the jobs decode from them); an
    unreadable one is reported now, and still never written over."""
    from ..latents import LatentFile
    from ..convert import check_output_kind
    from ..tokenizer import recorded_norm

    latents: dict[Path, LatentFile] = {}
    refused = []
    for p in filter(Path.is_file, paths):
        try:
            latents[p] = LatentFile.open(p)
        except CvaeError as e:
            out.error(str(e))
            refused.append(p)
    if files.output is not None and len(latents) == 1:
        check_output_kind(files.output, image=next(iter(latents.values())).meta.fps is None)
    image = {p: f.meta.fps is None for p, f in latents.items()}
    jobs = name_outputs([p for p in paths if p not in refused], files.output, files.out_dir,
                        lambda src: decoded_name(src, image.get(src, False)), unreadable=refused)
    return Work("decode", jobs, lambda src: _shape(latents[src]),
                lambda tok, pending, progress: tok.decode_many([(latents[src], dst) for src, dst in pending],
                                                               crf=crf, force=force, progress=progress, note=out.warn),
                refused, norm=recorded_norm(latents.values()))


def _shape(latent: LatentFile) -> tuple[int, int, bool, int | None]:
    meta = latent.meta
    return meta.width, meta.height, meta.fps is None, meta.padded_frames


@command
@grouped
def reconstruct(inputs: Inputs, files: Outputs, model: ModelOptions, select: SelectOptions, crf: Crf = 18,
                side_by_side: SideBySide = False, metrics_json: MetricsJson = None, no_metrics: NoMetrics = False,
                dry_run: DryRun = False, quiet: Quiet = False):
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
    check_crf(crf, files.output)
    if metrics_json is not None:
        if no_metrics:
            raise CvaeError("--metrics-json and --no-metrics: choose one")
        check_suffix(metrics_json, [".json"], "metrics")
    out, scores = Output(quiet), Scores()
    try:
        run_files(out, reconstruct_work(out, expand(inputs), files, select, crf, side_by_side, not no_metrics,
                                        scores), model, files.overwrite, dry_run)
    finally:
        scores.save(metrics_json)


def reconstruct_work(out: Output, paths: list[Path], files: Outputs, select: SelectOptions, crf: int,
                     side_by_side: bool, metrics: bool, scores: Scores) -> Work:
    from .. import media

    selection = select.selection()
    jobs = name_outputs(paths, files.output, files.out_dir, lambda src: recon_name(src, media.is_image(src)))
    return Work("reconstruct", jobs, lambda src: selection.model_shape(media.probe(src)),
                lambda tok, pending, progress: tok.reconstruct_many(
                    pending, select=selection, crf=crf, side_by_side=side_by_side, metrics=metrics,
                    progress=progress, note=out.warn),
                on_result=lambda src, result: scores.keep(out, src, result))


class Scores:
    """Each reconstruction's scores, said as they come and saved at the end (`--metrics-json`)."""

    def __init__(self):
        self.by_input: dict[str, dict] = {}

    def keep(self, out: Output, src: Path, result) -> None:
        if result.metrics_error:
            out.warn(f"{src.name}: no scores ({result.metrics_error}); the output was written")
        elif result.metrics is not None:
            codec = LOSSY.get(result.output.suffix.lower())
            out.info(escape(f"{src.name}: {result.metrics.line()}" + (f", before {codec} encoding" if codec else "")))
            self.by_input[str(src)] = result.metrics.summary()

    def save(self, path: Path | None) -> None:
        from ..atomic import atomic_path

        if path and self.by_input:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(self.by_input, indent=1, allow_nan=False))
