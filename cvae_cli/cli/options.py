"""Option types shared by the commands (declared once); the option groups several commands take
(`Outputs`, `ModelOptions`, `SelectOptions`), each a dataclass that `grouped` spreads into a
command's options; and parsing them into library values, refusing what means nothing before any
output is looked at or any weights are loaded."""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer
from rich.markup import escape

from .. import interrupt
from ..errors import CvaeError
from .output import Output

if TYPE_CHECKING:
    from ..selection import Selection
    from ..tokenizer import Cut, Tokenizer


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
Norm = Annotated[Optional[str], typer.Option("--norm", help="Override the model's GroupNorm: clip or frame. Latents "
                                                            "record it: decode uses theirs unless told otherwise.")]
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


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CvaeError(f"{option} {text}: expected a whole number") from None


def selection(frames: str | None, fps: float | None, size: str | None, max_side: int | None,
              allow_partial: bool) -> Selection:
    """The frames, rate and size asked for; values that select nothing or mean nothing are refused
    here, in one line, before any output is looked at or any weights are loaded."""
    from ..selection import Selection

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
    if wh and max_side:
        raise CvaeError("--size and --max-side both set the size: give one")
    return Selection(start=start, end=end, fps=fps, size=wh, max_side=max_side, allow_partial=allow_partial)


CRF_RANGE = {"libx264": 51, "libvpx-vp9": 63}  # the encoder's own scale: 0 (lossless) .. this


def check_crf(crf: int, output: Path | None) -> None:
    """--crf within the scale of the codec the output will use (.webm: VP9, any other video: H.264)."""
    codec = "libvpx-vp9" if output is not None and output.suffix.lower() == ".webm" else "libx264"
    top = CRF_RANGE[codec]
    if not 0 <= crf <= top:
        name = "VP9 (.webm)" if codec == "libvpx-vp9" else "H.264 (.mp4, .mov, .mkv)"
        raise CvaeError(f"--crf {crf}: {name} takes 0 (lossless) to {top}; 18 looks lossless")


# --- option groups ---------------------------------------------------------------------------------

def grouped(fn):
    """Let a command take an option group (a dataclass whose fields are option types) as one
    parameter: Typer sees the group's fields as the command's options, in its place, and the
    command gets the group built from them. A group is so declared once for every command."""
    signature = inspect.signature(fn, eval_str=True)
    params, groups = [], {}
    for p in signature.parameters.values():
        if dataclasses.is_dataclass(p.annotation):
            groups[p.name] = p.annotation
            hints = typing.get_type_hints(p.annotation, include_extras=True)
            params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=_in_panel(
                hints[f.name], p.annotation.PANEL), default=f.default) for f in dataclasses.fields(p.annotation)]
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def command(**kwargs):
        for name, group in groups.items():
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)})
        return fn(**kwargs)

    command.__signature__ = signature.replace(parameters=params)
    command.__annotations__ = {}
    return command


def _in_panel(option, panel: str):
    """The option type, shown in `--help` under its group's heading."""
    base, info = typing.get_args(option)
    info = copy.copy(info)
    info.rich_help_panel = panel
    return Annotated[base, info]


@dataclass(frozen=True)
class Outputs:
    """Where a file command writes, and whether it may replace what is there."""

    PANEL = "Outputs"

    output: OutFile = None
    out_dir: OutDir = None
    overwrite: Overwrite = False


@dataclass(frozen=True)
class ModelOptions:
    """Which weights, where, in what precision, how fast, and how inputs are cut: what every command
    that runs the model takes. A cut, device or dtype that cannot work is refused on parsing."""

    PANEL = "Model"

    weights: Weights = None
    device: Device = "auto"
    dtype: Dtype = "auto"
    mode: Mode = "auto"
    chunk: Chunk = "auto"
    tile: Tile = "auto"
    memory_budget: MemoryBudget = "auto"
    norm: Norm = None
    fast: Fast = False
    compile: Compile = False

    def __post_init__(self):
        from ..device import resolve

        self.cut()
        resolve(self.device, self.dtype)

    def cut(self) -> Cut:
        from ..budget import parse_size
        from ..tokenizer import Cut

        tile = self.tile if self.tile == "auto" else None if self.tile == "off" else _int(self.tile, "--tile")
        return Cut(self.mode, None if self.chunk == "auto" else _int(self.chunk, "--chunk"), tile,
                   None if self.memory_budget == "auto" else parse_size(self.memory_budget))

    def load(self, out: Output, direction: str, *, local_rank: int | None = None,
             norm: str | None = None) -> Tokenizer:
        """The Tokenizer (`norm` where --norm is not given), with what loading chose or warns of
        said; `direction` (encode, decode, reconstruct): whose peak the memory budget holds."""
        from ..tokenizer import Tokenizer

        cut = self.cut()
        tok = Tokenizer.load(self.weights, self.device, self.dtype, self.norm or norm, self.fast, self.compile,
                             cut.mode, cut.chunk, cut.tile, cut.memory_budget, local_rank=local_rank,
                             direction=direction, on_warning=out.warn)
        for note in tok.notes:
            out.info(escape(f"note: {note}"))
        interrupt.check()  # loading takes a while: a Ctrl-C during it stops here
        return tok


@dataclass(frozen=True)
class SelectOptions:
    """Which frames of each input, at what rate and size."""

    PANEL = "Frames"

    frames: Frames = None
    fps: Fps = None
    size: Size = None
    max_side: MaxSide = None
    allow_partial: AllowPartial = False

    def __post_init__(self):
        self.selection()

    def selection(self) -> Selection:
        return selection(self.frames, self.fps, self.size, self.max_side, self.allow_partial)
