"""`cvae inflate` and `cvae info`: making weights, and describing files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import CvaeError
from ..outputs import check_suffix, expand
from .app import command
from .options import Inputs, Overwrite, Quiet
from .output import Output


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
    from ..checkpoints import DEFAULT_SD_VAE, fetch_sd_vae, save_model
    from ..inflate import ARCHS, INITS, inflate as inflate_sd

    out = Output(quiet)
    if init not in INITS:
        raise CvaeError(f"--init {init}: use one of {', '.join(INITS)}")
    if arch not in ARCHS:
        raise CvaeError(f"--arch {arch}: use one of {', '.join(ARCHS)}")
    if norm not in ("frame", "clip"):
        raise CvaeError(f"--norm {norm}: use frame or clip")
    from ..checkpoints import INFLATED_WEIGHTS, data_dir

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
    console, out = Console(highlight=False, soft_wrap=True), Output()
    paths, failed = expand(files), 0
    for path in paths:  # a bad file is said and skipped; the others are still described
        try:
            if not path.exists():
                raise CvaeError(f"no such file: {path}")
            lines = list(_describe(path))
        except CvaeError as e:
            out.error(str(e))
            failed += 1
            continue
        for line in lines:
            console.print(escape(line))
    if failed:
        raise typer.Exit(1)


_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def _describe(path: Path) -> Iterator[str]:
    from .. import media
    from ..checkpoints import weights_info
    from ..latents import LatentFile

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
    if m.frame_count is None:
        frames = "unknown (the container states none and no packet could be read)"
    elif m.frames_from == "packets":
        frames = f"{m.frame_count} (counted: " + (f"the container claims {m.claimed_frames})" if m.claimed_frames
                                                  else "the container does not state it)")
    elif m.frames_from == "duration":
        frames = f"about {m.frame_count} (from duration x rate)"
    else:
        frames = f"{m.frame_count} (as the container says)"
    yield f"{path}: video, {m.width}x{m.height}, {m.codec}"
    yield f"  frames: {frames}"
    yield f"  fps: {m.fps} ({float(m.fps):.3f})" if m.fps else "  fps: unknown"
    if m.rotation:
        yield f"  rotation: {m.rotation} degrees (applied when read)"
