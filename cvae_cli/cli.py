"""`cvae`: the command line. Arguments, messages and progress only; the work is in the library.

Every command is: parse its options, name its outputs (`outputs`: refused before any weights are
loaded when they would lose or overwrite data), load the model through the one shared preamble
(`load_engine`), run the jobs (`report`). Every user-facing failure is a `CvaeError`, turned into
one line and exit status 1 in `CvaeGroup.invoke`; with many inputs, each failure is reported and
the others still run. Ctrl-C and SIGTERM stop at the next safe point (`interrupt`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, ContextManager, Iterable, Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from . import interrupt
from .errors import CvaeError, describe
from .outputs import check_suffix, expand, name_outputs

if TYPE_CHECKING:
    from .model import CausalVAE
    from .pipeline import Selection
    from .stream import StreamOptions


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("cvae-cli")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _no_flag_metavars(params: list) -> list:
    """Flags take no value: show none (recent Typer prints `<bool>` beside every flag)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class CvaeCommand(TyperCommand):
    def get_params(self, ctx):
        return _no_flag_metavars(super().get_params(ctx))


class CvaeGroup(TyperGroup):
    """Runs a command with Ctrl-C and SIGTERM stopping it at a safe point, and turns what escapes
    into one line on stderr: a `CvaeError` into exit status 1, an interruption into 130 (SIGINT) or
    143 (SIGTERM), anything else (a bug, a driver failure) into 2, with the traceback under
    CVAE_DEBUG=1."""

    def get_params(self, ctx):
        return _no_flag_metavars(super().get_params(ctx))

    def invoke(self, ctx: typer.Context):
        out = Output(prefix=_rank_prefix())
        try:
            with interrupt.signals_stop_at_safe_points():
                return super().invoke(ctx)
        except CvaeError as e:
            out.error(str(e))
            raise typer.Exit(1) from None
        except interrupt.Interrupted as e:
            out.error(f"{e.reason}: no partial output was kept")
            raise typer.Exit(e.status) from None
        except KeyboardInterrupt:
            out.error("interrupted: no partial output was kept")
            raise typer.Exit(130) from None
        except Exception as e:  # a bug or an environment failure: still one line, unless debugging
            if os.environ.get("CVAE_DEBUG") or type(e).__module__.split(".")[0] in ("click", "typer"):
                raise  # usage errors and exits: Typer prints those itself
            hint = " (try --chunk 4, or for a photo --tile 512)" if "out of memory" in str(e).lower() else ""
            out.error(f"{describe(e)}{hint} [set CVAE_DEBUG=1 for the traceback]")
            raise typer.Exit(2) from None


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _rank_prefix() -> str:
    """`[rank r] ` under torchrun, so each process's line says whose it is."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f"[rank {rank}] " if world not in ("", "1") else ""


app = typer.Typer(cls=CvaeGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Causal video VAE tokenizer: videos and images to latents and back "
                       "(Open-Sora-Plan's CausalVAE, 4x8x8 compression, 4 latent channels).")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"cvae {version()}")
        raise typer.Exit()


@app.callback()
def main(_: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                         help="Print the version and exit.")] = False) -> None:
    pass


def command(fn):
    return app.command(cls=CvaeCommand)(fn)


# --- output ------------------------------------------------------------------------------------

def _rate(task) -> float | None:
    """Frames per second since the job began. Not rich's own `task.speed`: that needs two updates
    within its last 30 s, and one chunk through the model on a CPU can take longer than that, so
    the rate and the time left would show only at the end, or never."""
    elapsed = task.elapsed
    return task.completed / elapsed if elapsed and task.completed else None


class FpsColumn(ProgressColumn):
    def render(self, task) -> Text:
        rate = _rate(task)
        return Text(f"{rate:.1f} frames/s" if rate else "", style="progress.data.speed")


class TimeLeftColumn(ProgressColumn):
    def render(self, task) -> Text:
        rate = _rate(task)
        if task.finished:
            left = 0
        elif rate is None or task.total is None:
            return Text("-:--:--", style="progress.remaining")
        else:
            left = int(max(task.total - task.completed, 0) / rate)
        return Text(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}", style="progress.remaining")


def BAR_COLUMNS() -> tuple[ProgressColumn, ...]:  # noqa: N802 (a constant, made fresh per bar)
    """A progress bar's columns: what, the bar, frames done/total, frames/s, time left."""
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), FpsColumn(), TimeLeftColumn())


class Output:
    """All printing goes through here, so `--quiet` silences everything but errors. On a terminal
    progress is a bar (frames through the model, frames/s, time left); elsewhere (logs, CI) a line
    every `every_s` seconds."""

    every_s = 5.0

    def __init__(self, quiet: bool = False, prefix: str = ""):
        self.quiet, self.prefix = quiet, prefix
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[yellow]warning:[/] {escape(message)}")

    def error(self, message: str) -> None:
        self.console.print(f"[bold red]error:[/] {escape(self.prefix + message)}")

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if self.quiet:
            yield lambda n: None
        elif self.console.is_terminal:
            with Progress(*BAR_COLUMNS(), console=self.console, transient=True) as bar:
                task = bar.add_task(escape(description), total=total)
                yield lambda n: bar.advance(task, n)
        else:
            yield _Ticker(self, description, total).advance


class _Ticker:
    """Progress for logs: one line every `Output.every_s` seconds, none for a job shorter than that."""

    def __init__(self, out: Output, description: str, total: int | None):
        self.out, self.description, self.total = out, description, total
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.out.every_s:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            self.out.info(escape(f"{self.description}: {self.done}{of} frames, "
                                 f"{self.done / max(now - self.start, 1e-9):.1f} frames/s"))


# --- shared options ----------------------------------------------------------------------------

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
Tile = Annotated[str, typer.Option("--tile", help="Spatial tiles: auto, off, or a tile side in pixels. auto tiles "
                                   "photos above 1080p by 512; a video that streams exactly keeps whole frames.")]
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


# --- the shared preamble -----------------------------------------------------------------------

def load_weights(weights: str | None, device, dtype, norm: str | None, fast: bool = False, compile: bool = False,
                 out: Output | None = None) -> CausalVAE:
    """The model, on its device in its dtype, with the speed levers asked for. No --weights: the SD
    VAE `cvae inflate` made, else the built-in small model (said in one line)."""
    from .checkpoints import default_weights, load_model

    if weights is None:
        path, builtin = default_weights()
        if builtin:
            (out or Output()).info("note: using the built-in small model (cvae-small, trained on a CPU); "
                                   "`cvae inflate` makes the better Stable Diffusion one")
        weights = str(path)
    model = load_model(weights, norm=norm, device=device, dtype=dtype)
    if fast or compile:
        from .accel import speed_up

        speed_up(model, fast=fast, compile=compile)
    return model


@dataclass(frozen=True)
class Cut:
    """How the user asked videos to be cut for the model (`auto` fields are chosen per size)."""

    mode: str = "auto"
    chunk: int | None = None
    tile: int | str | None = "auto"

    @classmethod
    def parse(cls, mode: str, chunk: str, tile: str) -> Cut:
        from .stream import MODES, StreamOptions

        if mode not in ("auto", *MODES):
            raise CvaeError(f"--mode {mode}: use auto, {', '.join(MODES)}")
        cut = cls(mode, None if chunk == "auto" else _int(chunk, "--chunk"),
                  tile if tile == "auto" else None if tile == "off" else _int(tile, "--tile"))
        try:  # refuse a bad --chunk or --tile now, not after loading the weights
            StreamOptions(chunk=cut.chunk or 16, tile=cut.tile if isinstance(cut.tile, int) else None)
        except ValueError as e:
            raise CvaeError(str(e)) from None
        return cut


@dataclass
class Engine:
    """What encode, decode and reconstruct share: the loaded model and the cut asked for."""

    model: CausalVAE
    cut: Cut

    def options(self, width: int, height: int, image: bool = False) -> StreamOptions:
        from .stream import choose_options

        try:
            return choose_options(self.model.config, width, height, self.cut.mode, self.cut.chunk, self.cut.tile, image)
        except ValueError as e:
            raise CvaeError(str(e)) from None


def load_engine(out: Output, weights: str | None, device: str, dtype: str, norm: str | None, fast: bool, compile: bool,
                cut: Cut, local_rank: int | None = None) -> Engine:
    from .device import resolve
    from .stream import exact_streaming

    dev, dt = resolve(device, dtype, local_rank)
    model = load_weights(weights, dev, dt, norm, fast, compile, out)
    if cut.mode == "stream" and not exact_streaming(model.config):
        out.warn("--mode stream only approximates this model (its norm or attention spans the whole clip); "
                 "--mode auto cuts it as Open-Sora-Plan does")
    interrupt.check()  # loading takes a while: a Ctrl-C during it stops here
    return Engine(model, cut)


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CvaeError(f"{option} {text}: expected a whole number") from None


def selection(frames: str | None, fps: float | None, size: str | None, max_side: int | None,
              allow_partial: bool) -> Selection:
    from .pipeline import Selection

    start, end = 0, None
    if frames:
        a, sep, b = frames.partition(":")
        if not sep:
            raise CvaeError(f"--frames {frames}: expected A:B, e.g. 0:65 or :33")
        start, end = (_int(a, "--frames") if a else 0), (_int(b, "--frames") if b else None)
    wh = None
    if size:
        w, sep, h = size.lower().partition("x")
        if not sep:
            raise CvaeError(f"--size {size}: expected WxH, e.g. 1280x720")
        wh = (_int(w, "--size"), _int(h, "--size"))
    return Selection(start=start, end=end, fps=fps, size=wh, max_side=max_side, allow_partial=allow_partial)


# --- running many jobs -------------------------------------------------------------------------

Job = tuple[Path, Path]  # (input, output)


@dataclass
class Triage:
    """Jobs sorted before any weights are loaded: to run, skipped (output exists), failed already."""

    pending: list[Job]
    skipped: int
    failed: list[Path]


def triage(out: Output, jobs: list[Job], overwrite: bool, dry_run: bool = False,
           failed: list[Path] | None = None) -> Triage:
    """Report missing inputs now; skip existing outputs unless `overwrite`; list the rest."""
    result = Triage([], 0, list(failed or []))
    for src, dst in jobs:
        if not src.is_file():
            result.failed.append(src)
            out.error(f"no such file: {src}" if not src.exists() else f"{src} is not a file")
        elif dst.exists() and not overwrite:
            result.skipped += 1
            out.info(escape(f"skip {dst} exists (use --overwrite)"))
        else:
            result.pending.append((src, dst))
            if dry_run:
                out.info(escape(f"{src} -> {dst}"))
    return result


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
    from .pipeline import attempt

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


# --- commands ----------------------------------------------------------------------------------

@command
def inflate(
    source: Annotated[Optional[str], typer.Option("--from", help="SD VAE: a hub repo id, or a local .safetensors/"
                                                  ".bin/.ckpt in the diffusers or CompVis layout.")] = None,
    init: Annotated[str, typer.Option("--init", help="tail (reconstructs untrained), center, average or random.")] = "tail",
    arch: Annotated[str, typer.Option("--arch", help="v1.0.0 (default) or v1.1.0 (for fine-tuning).")] = "v1.0.0",
    norm: Annotated[str, typer.Option("--norm", help="frame (exact streaming, default) or clip.")] = "frame",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write the weights "
                                                   "(.safetensors).")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Make a causal video VAE from the Stable Diffusion image VAE.

    The hub is asked only when the SD VAE is not in the local Hugging Face cache. Existing weights
    are kept unless --overwrite: latents made with them decode only with them.

    Examples:

    ```
        cvae inflate                                   # stabilityai/sd-vae-ft-mse -> ~/.local/share/cvae/cvae-tail.safetensors
        cvae inflate --from ./vae-ft-mse-840000-ema-pruned.ckpt --init center -o weights/center.safetensors
    ```
    """
    from .checkpoints import DEFAULT_SD_VAE, fetch_sd_vae, save_model
    from .inflate import ARCHS, INITS, inflate as inflate_sd

    out = Output(quiet)
    if init not in INITS:
        raise CvaeError(f"--init {init}: use one of {', '.join(INITS)}")
    if arch not in ARCHS:
        raise CvaeError(f"--arch {arch}: use one of {', '.join(ARCHS)}")
    if norm not in ("frame", "clip"):
        raise CvaeError(f"--norm {norm}: use frame or clip")
    from .checkpoints import INFLATED_WEIGHTS, data_dir

    output = output or data_dir() / (INFLATED_WEIGHTS if init == "tail" and arch == "v1.0.0" and norm == "frame"
                                     else f"cvae-{init}-{arch}-{norm}.safetensors")
    check_suffix(output, [".safetensors"], "weights")
    if output.exists() and not overwrite:
        raise CvaeError(f"{output} exists: pass --overwrite to replace it (latents made with it will then "
                        "decode only with a copy of it)")
    path = fetch_sd_vae(source)
    if source and Path(output).resolve() == Path(path).resolve():
        raise CvaeError(f"{output} is the input of this command: refusing to write over it")
    model = inflate_sd(path, init=init, norm=norm, arch=arch)
    model.provenance["source"] = source or DEFAULT_SD_VAE
    save_model(model, output)
    params = sum(p.numel() for p in model.parameters())
    out.info(escape(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, {params / 1e6:.1f} M parameters, "
                    f"init {init}, arch {arch}, norm {norm})"))


@command
def info(files: Inputs):
    """Describe files: latents and weights (what cvae writes and reads), and videos and images
    (size, frames, frame rate, codec, as ffprobe would).

    Examples:

    ```
        cvae info clip.safetensors
        cvae info ~/.local/share/cvae/cvae-tail.safetensors
        cvae info clip.mp4 photo.jpg
    ```
    """
    console = Console(highlight=False, soft_wrap=True)
    for path in expand(files):
        if not path.exists():
            raise CvaeError(f"no such file: {path}")
        for line in _describe(path):
            console.print(escape(line))


_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def _describe(path: Path) -> Iterator[str]:
    from . import media
    from .checkpoints import weights_info
    from .latents import LatentFile

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                keys = f.metadata() or {}
        except Exception as e:
            raise CvaeError(f"{path} is not a readable safetensors file: {e}") from None
        if any(k.startswith("cvae.") for k in keys):
            with LatentFile.open(path) as latent:
                yield f"{path}: latents {tuple(latent.shape)} ({'with' if latent.has_logvar else 'no'} logvar)"
                for k, v in vars(latent.meta).items():
                    if k == "frame_times" and v is not None:
                        yield f"  {k}: {len(v)} times over {float(v[-1]):.3f} s (variable frame rate)"
                    elif k not in ("model_config", "frame_times"):
                        yield f"  {k}: {v}"
            return
    if path.is_dir() or path.suffix in (".safetensors", *_WEIGHT_SUFFIXES):
        info = weights_info(path)
        yield f"{path}: weights, {info['parameters'] / 1e6:.1f} M parameters, {info['dtype']}"
        for k, v in info.items():  # provenance: how the weights were made, trained, scored
            if k not in ("parameters", "dtype", "config", "format"):
                yield f"  {k}: {v}"
        if info.get("config"):
            yield f"  config: {json.dumps(info['config'], sort_keys=True)}"
        return
    try:
        m = media.probe(path)
    except CvaeError as e:
        raise CvaeError(f"{e} (cvae info describes videos, images, latents and weights)") from None
    if m.is_image:
        yield f"{path}: image, {m.width}x{m.height}, {m.codec}"
        return
    frames = f"{m.frame_count} (as the container says)" if m.frame_count else "not stated by the container"
    yield f"{path}: video, {m.width}x{m.height}, {m.codec}"
    yield f"  frames: {frames}"
    yield f"  fps: {m.fps} ({float(m.fps):.3f})" if m.fps else "  fps: unknown"
    if m.rotation:
        yield f"  rotation: {m.rotation} degrees (applied when read)"


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
    dry_run: DryRun = False,
    weights: Weights = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    mode: Mode = "auto",
    chunk: Chunk = "auto",
    tile: Tile = "auto",
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
    ```
    """
    out = Output(quiet)
    select = selection(frames, fps, size, max_side, allow_partial)
    cut = Cut.parse(mode, chunk, tile)
    seed_or_none = seed if sample else None
    if manifest is not None:
        if inputs or output is not None or out_dir is None:
            raise CvaeError("--manifest takes no input files and no -o; it needs --out-dir")
        return encode_manifest(out, manifest, out_dir, dry_run, select, cut, weights, device, dtype, norm, fast,
                               compile, seed_or_none, save_logvar, overwrite, batch_size)
    if not inputs:
        raise CvaeError("give input files, or --manifest")
    if output is not None:
        check_suffix(output, [".safetensors"], "latents")
    jobs = name_outputs(expand(inputs), output, out_dir, lambda src: src.stem + ".safetensors")
    todo = triage(out, jobs, overwrite, dry_run)
    if dry_run:
        raise typer.Exit(1 if todo.failed else 0)
    outcomes: Iterable = ()
    if todo.pending:
        from .pipeline import encode_many

        engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut)
        outcomes = encode_many(engine.model, [(src, dst, select) for src, dst in todo.pending], engine.options,
                               batch_size=batch_size, seed=seed_or_none, save_logvar=save_logvar,
                               progress=lambda name, total: out.progress(f"encoding {name}", total))
    report(out, len(jobs), todo, outcomes)


def encode_manifest(out: Output, manifest: Path, out_dir: Path, dry_run: bool, select: Selection, cut: Cut,
                    weights: str, device: str, dtype: str, norm: str | None, fast: bool, compile: bool,
                    seed: int | None, save_logvar: bool, overwrite: bool, batch_size: int) -> None:
    """`encode --manifest`: one process, or this rank's share under torchrun (see `dataset`)."""
    from . import dataset
    from .distributed import Dist

    clips = dataset.read_manifest(manifest)
    dist = Dist.from_env()
    if dry_run:
        with dist.session(dist.device(device)):
            plan = dataset.make_plan(clips, out_dir, dist, overwrite)
            if dist.rank == 0:
                for line in plan.lines():
                    typer.echo(line)
        raise typer.Exit(1 if plan.missing() else 0)  # as a plain --dry-run: a missing input fails
    with dist.session(dist.device(device)):
        engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut, dist.local_rank)
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
                                       note=note, progress=progress)
    if dist.rank == 0:
        out.info(escape(f"{summary.line()} -> {out_dir / 'summary.json'}"))
        if summary.failed:
            out.error(f"{summary.failed} clip(s) failed: see {out_dir / 'failures.jsonl'}")
            raise typer.Exit(1)  # rank 0 speaks for the run; the others exit 0


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
    from .latents import LatentFile
    from .pipeline import check_output_kind, decode_file

    out = Output(quiet)
    cut = Cut.parse(mode, chunk, tile)
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
        raise typer.Exit(1 if todo.failed else 0)
    outcomes: Iterable = ()
    if todo.pending:
        engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut)
        outcomes = one_by_one(out, todo.pending, "decoding", latents.__getitem__, lambda latent: latent.meta.frames,
                              lambda latent, dst, advance: decode_file(engine.model, latent, dst, engine.options,
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
    norm: Norm = None,
    fast: Fast = False,
    compile: Compile = False,
    frames: Frames = None,
    fps: Fps = None,
    size: Size = None,
    max_side: MaxSide = None,
    crf: Crf = 18,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Write input and reconstruction side by side.")] = False,
    metrics_json: Annotated[Optional[Path], typer.Option("--metrics-json", help="Save per-frame PSNR/SSIM here.")] = None,
    allow_partial: AllowPartial = False,
    dry_run: DryRun = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Encode and decode in one pass and score the result (PSNR, SSIM against the input):
    X.mp4 -> X.recon.mp4, an image -> X.recon.png. Audio and alpha are dropped; --frames counts
    frames after --fps resampling.

    Examples:

    ```
        cvae reconstruct photo.png                     # writes photo.recon.png, prints PSNR/SSIM
        cvae reconstruct clip.mp4 --side-by-side --metrics-json clip.metrics.json
    ```
    """
    from . import media
    from .atomic import atomic_path
    from .pipeline import reconstruct_file

    out = Output(quiet)
    select = selection(frames, fps, size, max_side, allow_partial)
    cut = Cut.parse(mode, chunk, tile)
    paths = expand(inputs)
    if metrics_json is not None:
        check_suffix(metrics_json, [".json"], "metrics")
    jobs = name_outputs(paths, output, out_dir,
                        lambda src: src.stem + ".recon" + (".png" if media.is_image(src) else ".mp4"))
    todo = triage(out, jobs, overwrite, dry_run)
    if dry_run:
        raise typer.Exit(1 if todo.failed else 0)
    scores = {}

    def keep_score(src: Path, result) -> None:
        m = result.metrics
        out.info(escape(f"{src.name}: PSNR {m.mean_psnr:.2f} dB, SSIM {m.mean_ssim:.4f} over {count(len(m.psnr), 'frame')}"))
        scores[str(src)] = {**m.summary(), "psnr_per_frame": m.psnr, "ssim_per_frame": m.ssim}

    outcomes: Iterable = ()
    if todo.pending:
        engine = load_engine(out, weights, device, dtype, norm, fast, compile, cut)
        outcomes = one_by_one(out, todo.pending, "reconstructing", media.open_media,
                              lambda source: select.expected_frames(source.info),
                              lambda source, dst, advance: reconstruct_file(
                                  engine.model, source, dst, engine.options, select, crf=crf,
                                  side_by_side=side_by_side, progress=advance))
    try:
        report(out, len(paths), todo, outcomes, on_result=keep_score)
    finally:
        if metrics_json and scores:
            with atomic_path(metrics_json) as tmp:
                tmp.write_text(json.dumps(scores, indent=1, default=float))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())


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
    from .distributed import Dist
    from .train import Report, Start, TrainOptions, train as run_training

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

    from .train import Report

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
    from .plot import plot_runs

    out = Output(quiet)
    check_suffix(output, [".png", ".svg", ".pdf"], "figures")
    if output.exists() and not overwrite:
        raise CvaeError(f"{output} exists: pass --overwrite to replace it")
    plot_runs(runs, output, tuple(column or ("loss", "val_psnr")), label, title)
    out.info(f"[green]wrote[/] {escape(str(output))}")


@command
def bench(
    weights: Weights = None,
    config: Annotated[str, typer.Option("--config", help="Without --weights: random weights of a released layout, "
                                                        "v1.0.0 or v1.1.0 (nothing is downloaded).")] = "v1.0.0",
    size: Annotated[str, typer.Option("--size", help="Frame size WxH.")] = "1280x720",
    frames: Annotated[int, typer.Option("--frames", help="Frames in the clip: 1 + 4k.")] = 17,
    chunk: Annotated[int, typer.Option("--chunk", help="Frames per streaming chunk (a multiple of 4).")] = 16,
    dtype: Dtype = "auto",
    device: Device = "auto",
    compare: Annotated[bool, typer.Option("--compare", help="Also the plain path, --fast and --compile, "
                                                          "interleaved with the default.")] = False,
    repeat: Annotated[int, typer.Option("--repeat", help="Timed runs of each, after a warm-up round.")] = 3,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the figures here (a new file).")] = None,
):
    """Frames/s, peak memory beside its exact count, GFLOP per frame and TFLOP/s, on this machine."""
    from .bench import COMPARE, BenchOptions, bench as measure, parse_size

    width, height = parse_size(size)
    measure(BenchOptions(weights=weights, config=config, width=width, height=height, frames=frames, chunk=chunk,
                         dtype=dtype, device=device, variants=COMPARE if compare else ("default",), repeat=repeat),
            json_out, say=typer.echo)
