"""Option types shared by the commands (declared once), and parsing them into library values."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer

from ..errors import CvaeError
from .output import Output

if TYPE_CHECKING:
    from ..pipeline import Selection


Inputs = Annotated[List[str], typer.Argument(help="Input files (globs allowed).", show_default=False)]
OutFile = Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file (one input only).")]
OutDir = Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for the outputs of many inputs.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs instead of skipping them "
                                                              "(never an input of the command).")]
Weights = Annotated[Optional[str], typer.Option(
    "--weights", "-w", envvar="CVAE_WEIGHTS", show_default=False,
    help="Model weights: a cvae .safetensors, an Open-Sora-Plan folder, or a hub id like "
         "LanguageBind/Open-Sora-Plan-v1.1.0/vae. Default: the SD VAE `cvae inflate` made, else the built-in "
         "small model.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ... (auto: cuda when available).")]
Dtype = Annotated[str, typer.Option("--dtype", help="Compute dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.")]
Mode = Annotated[str, typer.Option("--mode", help="Time cutting: auto (stream a model that streams exactly, else "
                                                  "Open-Sora-Plan's 65-frame windows), stream (cached chunks; only "
                                                  "approximate for clip-norm models), window, or whole (one piece).")]
Chunk = Annotated[str, typer.Option("--chunk", help="Frames per chunk (multiple of 4), or auto by frame size.")]
Tile = Annotated[str, typer.Option("--tile", help="Spatial tiles: auto, off, or a tile side in pixels. auto: whole "
                                   "frames when they fit --memory-budget, else the largest tiles that do.")]
MemoryBudget = Annotated[str, typer.Option("--memory-budget", help="Memory the model may use, weights included "
                                           "(e.g. 12GiB, 800MiB): auto --chunk and --tile take the largest cut whose "
                                           "exact count fits. auto: the GPU's free memory, or the CPU's available "
                                           "RAM, less 10%.")]
Norm = Annotated[Optional[str], typer.Option("--norm", help="Override the model's GroupNorm: clip or frame.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Frames = Annotated[Optional[str], typer.Option("--frames", help="Frame range A:B (either side optional), counted "
                                                                "after --fps resampling.")]
Fps = Annotated[Optional[float], typer.Option("--fps", help="Resample to this frame rate.")]
Size = Annotated[Optional[str], typer.Option("--size", help="Resize to WxH.")]
MaxSide = Annotated[Optional[int], typer.Option("--max-side", help="Resize so the longer side is at most N.")]
AllowPartial = Annotated[bool, typer.Option("--allow-partial", help="Keep the frames of a truncated video.")]
Fast = Annotated[bool, typer.Option("--fast", help="Speed levers proven equal to the plain model: fused "
                                                 "GroupNorm+SiLU and cuDNN autotuning, ~1.3x on a GPU after ~30 s "
                                                 "of warm-up; for long jobs (see benchmarks/).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the encoder/decoder: minutes of warm-up, "
                                                       "then faster; for long runs.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1,
                                       help="Encode up to N inputs of one size together, stacked along the "
                                            "batch: keeps a GPU busy on images and short clips.")]
Crf = Annotated[int, typer.Option("--crf", help="Video quality: H.264 0 (lossless) .. 51, VP9 0 .. 63; "
                                               "18 looks lossless.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="List what would be done (and what is missing), and stop.")]


@dataclass(frozen=True)
class Cut:
    """How the user asked videos to be cut for the model (`auto` fields are chosen per size)."""

    mode: str = "auto"
    chunk: int | None = None
    tile: int | str | None = "auto"
    budget: int | None = None  # bytes; None: what the device has free (`budget.default_budget`)

    @classmethod
    def parse(cls, mode: str, chunk: str, tile: str, memory_budget: str = "auto") -> Cut:
        from ..budget import parse_size
        from ..stream import MODES, StreamOptions

        if mode not in ("auto", *MODES):
            raise CvaeError(f"--mode {mode}: use auto, {', '.join(MODES)}")
        cut = cls(mode, None if chunk == "auto" else _int(chunk, "--chunk"),
                  tile if tile == "auto" else None if tile == "off" else _int(tile, "--tile"),
                  None if memory_budget == "auto" else parse_size(memory_budget))
        try:  # refuse a bad --chunk or --tile now, not after loading the weights
            StreamOptions(chunk=cut.chunk or 16, tile=cut.tile if isinstance(cut.tile, int) else None)
        except ValueError as e:
            raise CvaeError(str(e)) from None
        return cut



def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CvaeError(f"{option} {text}: expected a whole number") from None


def selection(frames: str | None, fps: float | None, size: str | None, max_side: int | None,
              allow_partial: bool) -> Selection:
    """The frames, rate and size asked for; values that select nothing or mean nothing are refused
    here, in one line, before any output is looked at or any weights are loaded."""
    from ..pipeline import Selection

    start, end = 0, None
    if frames:
        a, sep, b = frames.partition(":")
        if not sep:
            raise CvaeError(f"--frames {frames}: expected A:B, e.g. 0:65 or :33")
        start, end = (_int(a, "--frames") if a else 0), (_int(b, "--frames") if b else None)
        if start < 0 or (end is not None and end < 0):
            raise CvaeError(f"--frames {frames}: frame numbers count from 0 (negative ones are not supported)")
        if end is not None and end <= start:
            raise CvaeError(f"--frames {frames}: no frames selected (the end is exclusive: {start}:{start + 1} "
                            f"is frame {start} alone)")
    if fps is not None and not fps > 0:  # `not >` also refuses nan
        raise CvaeError(f"--fps {fps:g}: a frame rate must be above 0")
    wh = None
    if size:
        w, sep, h = size.lower().partition("x")
        if not sep:
            raise CvaeError(f"--size {size}: expected WxH, e.g. 1280x720")
        wh = (_int(w, "--size"), _int(h, "--size"))
        if min(wh) < 1:
            raise CvaeError(f"--size {size}: width and height must be at least 1 pixel")
    if max_side is not None and max_side < 1:
        raise CvaeError(f"--max-side {max_side}: must be at least 1 pixel")
    return Selection(start=start, end=end, fps=fps, size=wh, max_side=max_side, allow_partial=allow_partial)


CRF_RANGE = {"libx264": 51, "libvpx-vp9": 63}  # the encoder's own scale: 0 (lossless) .. this


def check_crf(crf: int, output: Path | None) -> None:
    """--crf within the scale of the codec the output will use (.webm: VP9, any other video: H.264)."""
    codec = "libvpx-vp9" if output is not None and output.suffix.lower() == ".webm" else "libx264"
    top = CRF_RANGE[codec]
    if not 0 <= crf <= top:
        name = "VP9 (.webm)" if codec == "libvpx-vp9" else "H.264 (.mp4, .mov, .mkv)"
        raise CvaeError(f"--crf {crf}: {name} takes 0 (lossless) to {top}; 18 looks lossless")


def check_placement(device: str, dtype: str, out: Output) -> None:
    """Refuse a device or dtype that cannot work now, whether or not any output exists yet, and warn
    of a slow one: float16 on a CPU runs about 20x slower than float32 (no fast fp16 kernels)."""
    import torch

    from ..device import resolve

    place, dt = resolve(device, dtype)
    if place.type == "cpu" and dt == torch.float16:
        out.warn("--dtype fp16 on the CPU is about 20x slower than fp32 (the CPU has no fast fp16 kernels); "
                 "leave --dtype auto")
