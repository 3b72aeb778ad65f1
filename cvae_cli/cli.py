"""`cvae`: the command line. Argument parsing and messages only; the work is in the library.

Every user-facing failure is a `CvaeError`, turned into one line and a non-zero exit in
`CvaeGroup.invoke`; with many inputs, each failure is reported and the others still run.
"""
from __future__ import annotations

import glob
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.text import Text
from typer.core import TyperGroup

from .errors import CvaeError, describe



class CvaeGroup(TyperGroup):
    """Turns `CvaeError` (and Ctrl-C) into one line on stderr and exit status 1; anything else
    (a bug, a driver failure) into one line and status 2, with the traceback under CVAE_DEBUG=1."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except CvaeError as e:
            Output().error(str(e))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            Output().error("interrupted: no partial output was kept")
            raise typer.Exit(130) from None
        except Exception as e:  # a bug or an environment failure: still one line, unless debugging
            if os.environ.get("CVAE_DEBUG") or type(e).__module__.split(".")[0] in ("click", "typer"):
                raise  # usage errors and exits: Typer prints those itself
            hint = " (try a smaller --chunk or --tile 512)" if "out of memory" in str(e).lower() else ""
            Output().error(f"{describe(e)}{hint} [set CVAE_DEBUG=1 for the traceback]")
            raise typer.Exit(2) from None


app = typer.Typer(cls=CvaeGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Causal video VAE tokenizer: videos and images to latents and back "
                       "(Open-Sora-Plan's CausalVAE, 4x8x8 compression, 4 latent channels).")


class FpsColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} frames/s" if task.speed else "", style="progress.data.speed")


class Output:
    """All printing goes through here, so `--quiet` silences everything but errors."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def error(self, message: str) -> None:
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
        self.console.print(f"{escape(rank)}[bold red]error:[/] {escape(message)}")

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if self.quiet:
            yield lambda n: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), FpsColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True, disable=not self.console.is_terminal) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)


# --- shared options --------------------------------------------------------------------------

Inputs = Annotated[List[str], typer.Argument(help="Input files (globs allowed).", show_default=False)]
OutFile = Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file (one input only).")]
OutDir = Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for the outputs of many inputs.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs instead of skipping them.")]
Weights = Annotated[Optional[str], typer.Option(
    "--weights", "-w", envvar="CVAE_WEIGHTS", show_default=False,
    help="Model weights: a cvae .safetensors, an Open-Sora-Plan folder, or a hub id like "
         "LanguageBind/Open-Sora-Plan-v1.1.0/vae. Default: the SD VAE `cvae inflate` made, else the built-in "
         "small model.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ... (auto: cuda when available).")]
Dtype = Annotated[str, typer.Option("--dtype", help="Compute dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.")]
Mode = Annotated[str, typer.Option("--mode", help="Time cutting: stream (cached chunks, default), window "
                                                  "(Open-Sora-Plan's 65-frame windows) or whole (one piece).")]
Chunk = Annotated[str, typer.Option("--chunk", help="Frames per chunk (multiple of 4), or auto by frame size.")]
Tile = Annotated[str, typer.Option("--tile", help="Spatial tiles: auto, off, or a tile side in pixels.")]
Norm = Annotated[Optional[str], typer.Option("--norm", help="Override the model's GroupNorm: clip or frame.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Frames = Annotated[Optional[str], typer.Option("--frames", help="Frame range A:B (either side optional).")]
Fps = Annotated[Optional[float], typer.Option("--fps", help="Resample to this frame rate.")]
Size = Annotated[Optional[str], typer.Option("--size", help="Resize to WxH.")]
MaxSide = Annotated[Optional[int], typer.Option("--max-side", help="Resize so the longer side is at most N.")]
AllowPartial = Annotated[bool, typer.Option("--allow-partial", help="Keep the frames of a truncated video.")]
Fast = Annotated[bool, typer.Option("--fast", help="Speed levers proven equal to the plain model: channels-last "
                                                 "memory, fused GroupNorm+SiLU, cuDNN autotuning (see benchmarks/).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the encoder/decoder: minutes of warm-up, "
                                                       "then faster; for long runs.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1,
                                       help="Encode up to N inputs of one size together, stacked along the "
                                            "batch: keeps a GPU busy on images and short clips.")]
Crf = Annotated[int, typer.Option("--crf", help="H.264 quality (0 lossless .. 51; 18 looks lossless).")]


# --- helpers ---------------------------------------------------------------------------------

def expand(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) and not Path(item).exists() else [item]
        if not matches:
            raise CvaeError(f"no file matches {item}")
        paths += [Path(m) for m in matches]
    return paths


def output_for(src: Path, output: Path | None, out_dir: Path | None, suffix: str, count: int) -> Path:
    if output is not None:
        if count > 1:
            raise CvaeError("-o/--output takes one input; use --out-dir for several")
        return output
    return (out_dir or src.parent) / (src.stem + suffix)


def resolve_device(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CvaeError(f"--device {device}: no CUDA GPU is visible to this torch build")
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise CvaeError(f"--dtype {dtype}: use auto, fp32, bf16 or fp16")
    return device, names[dtype]


def load_weights(weights: str | None, device: str, dtype, norm: str | None, fast: bool = False,
                 compile: bool = False, out: Output | None = None):
    from .checkpoints import default_weights, load_model

    if weights is None:
        path, builtin = default_weights()
        if builtin:
            (out or Output()).info("note: using the built-in small model (cvae-small, trained on a CPU); "
                                   "`cvae inflate` makes the better Stable Diffusion one")
        weights = str(path)
    model = load_model(weights, norm=norm, device=device, dtype=dtype)
    if fast or compile:
        from .accel import Acceleration, prepare

        prepare(model, Acceleration(channels_last=fast, fused_norm=fast, compile=compile,
                                    cudnn_benchmark=fast and device.startswith("cuda")))
    return model


def stream_options(mode: str, chunk: str, tile: str, device: str, dtype, size: tuple[int, int]):
    from .stream import StreamOptions, auto_cut

    tile_px = tile if tile == "auto" else None if tile == "off" else _int(tile, "--tile")
    chunk_frames, tile_px = auto_cut(*size, None if chunk == "auto" else _int(chunk, "--chunk"), tile_px)
    try:
        return StreamOptions(mode=mode, chunk=chunk_frames, tile=tile_px, device=device, dtype=dtype)
    except ValueError as e:
        raise CvaeError(str(e)) from None


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CvaeError(f"{option} {text}: expected a whole number") from None


def selection(frames: str | None, fps: float | None, size: str | None, max_side: int | None, allow_partial: bool):
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


Job = tuple[Path, Path]  # (input, output)


def run_each(out: Output, jobs: list[Job], overwrite: bool, verb: str,
             run: Callable[[list[Job], Callable[[int], None]], list], total: Callable[[Path], int | None],
             batch_size: int = 1, key: Callable[[Path], object] | None = None) -> list:
    """Run jobs, skipping existing outputs: `run(batch, advance)` does `batch_size` of them at once
    (those with one `key`) and returns a result or an exception for each. Report every failure and
    go on; summarise many; exit 1 if any failed."""
    from .pipeline import batched

    results, failures, pending = [], [], []

    def fail(src: Path, error: BaseException):
        message = describe(error)
        out.error(message if len(jobs) == 1 or str(src) in message else f"{src}: {message}")
        failures.append(src)

    for src, dst in jobs:
        if dst.exists() and not overwrite:
            out.info(f"[yellow]skip[/] {dst} exists (use --overwrite)")
        elif not src.exists():
            fail(src, CvaeError(f"no such file: {src}"))
        else:
            pending.append((src, dst))
    for batch in batched(pending, batch_size, key and (lambda job: key(job[0]))):
        totals = [total(src) for src, _ in batch]
        name = batch[0][0].name if len(batch) == 1 else f"{len(batch)} files"
        with out.progress(f"{verb} {escape(name)}", None if None in totals else sum(totals)) as advance:
            try:
                outcomes = run(batch, advance)
            except CvaeError as e:
                outcomes = [e] * len(batch)
        for (src, dst), outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                fail(src, outcome)
                continue
            results.append(outcome)
            out.info(f"[green]wrote[/] {dst} ({outcome.frames} frame{'s' if outcome.frames != 1 else ''})")
    if len(jobs) > 1:
        out.info(f"{len(results)} done, {len(jobs) - len(results) - len(failures)} skipped, {len(failures)} failed")
    if failures:
        if len(jobs) > 1:
            for src in failures:
                out.error(f"failed: {src}")
        raise typer.Exit(1)
    return results


def one_at_a_time(job: Callable[[Path, Path, Callable[[int], None]], object]):
    """A `run` for `run_each` from a job that takes one (input, output)."""
    return lambda batch, advance: [job(*batch[0], advance)]


def frame_total(src: Path) -> int | None:
    from . import media

    try:
        info = media.probe(src)
    except CvaeError:
        return None
    return 1 if info.is_image else info.frame_count


# --- commands --------------------------------------------------------------------------------

@app.command()
def inflate(
    source: Annotated[Optional[str], typer.Option("--from", help="SD VAE: a hub repo id, or a local .safetensors/"
                                                  ".bin/.ckpt in the diffusers or CompVis layout.")] = None,
    init: Annotated[str, typer.Option("--init", help="tail (reconstructs untrained), center, average or random.")] = "tail",
    arch: Annotated[str, typer.Option("--arch", help="v1.0.0 (default) or v1.1.0 (for fine-tuning).")] = "v1.0.0",
    norm: Annotated[str, typer.Option("--norm", help="frame (exact streaming, default) or clip.")] = "frame",
    output: OutFile = None,
    quiet: Quiet = False,
):
    """Make a causal video VAE from the Stable Diffusion image VAE.

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
    path = fetch_sd_vae(source)
    model = inflate_sd(path, init=init, norm=norm, arch=arch)
    model.provenance["source"] = source or DEFAULT_SD_VAE
    save_model(model, output)
    params = sum(p.numel() for p in model.parameters())
    out.info(f"[green]wrote[/] {output} ({output.stat().st_size / 2**20:.1f} MiB, {params / 1e6:.1f} M parameters, "
             f"init {init}, arch {arch}, norm {norm})")


@app.command()
def info(files: Inputs):
    """Show what a weights file or a latent file holds.

    Examples:

    ```
        cvae info weights/cvae-tail.safetensors
        cvae info clip.safetensors
    ```
    """
    from safetensors import safe_open

    from .checkpoints import weights_info
    from .latents import LatentFile

    console = Console(highlight=False, soft_wrap=True)
    for path in expand(files):
        if not path.exists():
            raise CvaeError(f"no such file: {path}")
        keys = {}
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), "pt") as f:
                    keys = f.metadata() or {}
            except Exception as e:
                raise CvaeError(f"{path} is not a readable safetensors file: {e}") from None
        if any(k.startswith("cvae.") for k in keys):
            latent = LatentFile.open(path)
            meta = latent.meta
            console.print(f"[bold]{path}[/]: latents {tuple(latent.shape)} ({'with' if latent.has_logvar else 'no'} logvar)")
            for k, v in vars(meta).items():
                if k == "frame_times" and v is not None:
                    console.print(f"  {k}: {len(v)} times over {float(v[-1]):.3f} s (variable frame rate)")
                elif k not in ("model_config", "frame_times"):
                    console.print(f"  {k}: {v}")
            continue
        info = weights_info(path)
        console.print(f"[bold]{path}[/]: weights, {info['parameters'] / 1e6:.1f} M parameters, {info['dtype']}")
        for k in ("init", "arch", "source", "model_id", "format_version"):
            if k in info:
                console.print(f"  {k}: {info[k]}")
        if info.get("config"):
            console.print(f"  config: {json.dumps(info['config'], sort_keys=True)}")


@app.command()
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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --manifest: list what would be done, and stop.")] = False,
    weights: Weights = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    mode: Mode = "stream",
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
    sample: Annotated[bool, typer.Option("--sample", help="Store a posterior sample instead of its mean.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --sample.")] = 0,
    save_logvar: Annotated[bool, typer.Option("--save-logvar", help="Also store the posterior log-variance.")] = False,
    allow_partial: AllowPartial = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Encode videos or images to latent files (.safetensors).

    Examples:

    ```
        cvae encode clip.mp4 -o clip.safetensors
        cvae encode 'videos/*.mp4' --out-dir latents/ --max-side 512 --fps 24
        cvae encode 'images/*.jpg' --out-dir latents/ --size 512x512 --batch-size 32
        cvae encode photo.png --weights LanguageBind/Open-Sora-Plan-v1.1.0/vae
        cvae encode --manifest clips.csv --out-dir latents/ --dry-run
        torchrun --nproc_per_node 8 -m cvae_cli encode --manifest clips.csv --out-dir latents/
    ```
    """
    from .pipeline import encode_files, size_key

    out = Output(quiet)
    if manifest is not None:
        from . import batch

        if inputs or output is not None or out_dir is None:
            raise CvaeError("--manifest takes no input files and no -o; it needs --out-dir")
        clips = batch.read_manifest(manifest)
        dist = batch.Dist.from_env()
        dev, dt = resolve_device(dist.device(device), dtype)
        select = selection(frames, fps, size, max_side, allow_partial)
        with dist.session(dev):
            plan = batch.make_plan(clips, out_dir, dist, overwrite)
            if dry_run:
                if dist.rank == 0:
                    for line in plan.lines():
                        typer.echo(line)
                return
            model = load_weights(weights, dev, dt, norm, fast, compile, out)

            def clip_options(src: Path, sel):
                return stream_options(mode, chunk, tile, dev, dt, sel.model_size(src))

            # one process on a terminal: a bar per clip; else (logs, torchrun) one line per clip,
            # prefixed with the rank, written whole so processes never interleave mid-line
            bars = dist.world == 1 and out.console.is_terminal
            note = (lambda m: None) if quiet else (out.info if bars else batch.line_writer(dist.rank, dist.world))
            mine, failures = batch.run_plan(model, plan, clip_options, select, rank=dist.rank,
                                            seed=seed if sample else None, save_logvar=save_logvar,
                                            overwrite=overwrite, batch_size=batch_size, note=lambda m: note(escape(m) if bars else m),
                                            progress=(lambda name, total: out.progress(f"encoding {escape(name)}", total))
                                            if bars else None)
            summary = batch.finish(dist, out_dir, mine, failures)
            if dist.rank == 0:
                out.info(escape(f"{summary.line()} -> {out_dir / 'summary.json'}"))
                if summary.failed:
                    out.error(f"{summary.failed} clip(s) failed: see {out_dir / 'failures.jsonl'}")
        if summary.failed and dist.rank == 0:  # rank 0 speaks for the run; the others exit 0
            raise typer.Exit(1)
        return
    if not inputs:
        raise CvaeError("give input files, or --manifest")
    paths = expand(inputs)
    dev, dt = resolve_device(device, dtype)
    model = load_weights(weights, dev, dt, norm, fast, compile, out)
    select = selection(frames, fps, size, max_side, allow_partial)

    def run(batch: list[Job], advance):
        options = stream_options(mode, chunk, tile, dev, dt, select.model_size(batch[0][0]))
        return encode_files(model, [(src, dst, select) for src, dst in batch], options,
                            seed=seed if sample else None, save_logvar=save_logvar, progress=advance)

    jobs = [(p, output_for(p, output, out_dir, ".safetensors", len(paths))) for p in paths]
    run_each(out, jobs, overwrite, "encoding", run, frame_total, batch_size, lambda src: size_key(src, select))


@app.command()
def decode(
    inputs: Inputs,
    output: OutFile = None,
    out_dir: OutDir = None,
    weights: Weights = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    mode: Mode = "stream",
    chunk: Chunk = "auto",
    tile: Tile = "auto",
    norm: Norm = None,
    fast: Fast = False,
    compile: Compile = False,
    crf: Crf = 18,
    force: Annotated[bool, typer.Option("--force", help="Decode latents made by other weights anyway.")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Decode latent files to mp4 (H.264, yuv420p) at their original size and frame rate; a
    single-frame latent decodes to png.

    Examples:

    ```
        cvae decode clip.safetensors -o clip.mp4
        cvae decode 'latents/*.safetensors' --out-dir decoded/ --crf 12
    ```
    """
    from .latents import LatentFile
    from .pipeline import decode_file

    out = Output(quiet)
    paths = expand(inputs)
    dev, dt = resolve_device(device, dtype)
    model = load_weights(weights, dev, dt, norm, fast, compile, out)

    def suffix(p: Path) -> str:
        try:
            return ".png" if LatentFile.open(p).meta.fps is None else ".mp4"
        except CvaeError:
            return ".mp4"

    def job(src: Path, dst: Path, advance):
        meta = LatentFile.open(src).meta
        options = stream_options(mode, chunk, tile, dev, dt, (meta.width, meta.height))
        return decode_file(model, src, dst, options, crf=crf, force=force, progress=advance)

    def total(src: Path):
        try:
            return LatentFile.open(src).meta.frames
        except CvaeError:
            return None

    jobs = [(p, output_for(p, output, out_dir, suffix(p), len(paths))) for p in paths]
    run_each(out, jobs, overwrite, "decoding", one_at_a_time(job), total)


@app.command()
def reconstruct(
    inputs: Inputs,
    output: OutFile = None,
    out_dir: OutDir = None,
    weights: Weights = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    mode: Mode = "stream",
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
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Encode and decode in one pass and score the result (PSNR, SSIM against the input).

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
    paths = expand(inputs)
    dev, dt = resolve_device(device, dtype)
    model = load_weights(weights, dev, dt, norm, fast, compile, out)
    select = selection(frames, fps, size, max_side, allow_partial)
    report = {}

    def job(src: Path, dst: Path, advance):
        options = stream_options(mode, chunk, tile, dev, dt, select.model_size(src))
        result = reconstruct_file(model, src, dst, options, select,
                                  crf=crf, side_by_side=side_by_side, progress=advance)
        m = result.metrics
        out.info(f"{src.name}: PSNR {m.mean_psnr:.2f} dB, SSIM {m.mean_ssim:.4f} over {len(m.psnr)} frames")
        report[str(src)] = {**m.summary(), "psnr_per_frame": m.psnr, "ssim_per_frame": m.ssim}
        return result

    def suffix(p: Path) -> str:
        return ".recon" + (".png" if media.is_image(p) else ".mp4")

    jobs = [(p, output_for(p, output, out_dir, suffix(p), len(paths))) for p in paths]
    try:
        run_each(out, jobs, overwrite, "reconstructing", one_at_a_time(job), frame_total)
    finally:
        if metrics_json and report:
            with atomic_path(metrics_json) as tmp:
                tmp.write_text(json.dumps(report, indent=1, default=float))


@app.command()
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
    from .batch import Dist
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


@app.command()
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
    if output.exists() and not overwrite:
        raise CvaeError(f"{output} exists (use --overwrite)")
    plot_runs(runs, output, tuple(column or ("loss", "val_psnr")), label, title)
    out.info(f"[green]wrote[/] {escape(str(output))}")
