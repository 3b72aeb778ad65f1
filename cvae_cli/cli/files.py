"""`cvae inflate` and `cvae info`: making weights, and describing files."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import CvaeError
from ..outputs import expand
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
    from ..inflate import inflate_to_file

    output, model = inflate_to_file(source, init, arch, norm, output, overwrite)
    params = sum(p.numel() for p in model.parameters())
    Output(quiet).info(escape(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, {params / 1e6:.1f} M "
                              f"parameters, init {init}, arch {arch}, norm {norm})"))


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
    from ..describe import describe

    console, out = Console(highlight=False, soft_wrap=True), Output()
    failed = 0
    for path in expand(files):  # a bad file is said and skipped; the others are still described
        try:
            lines = list(describe(path))
        except CvaeError as e:
            out.error(str(e))
            failed += 1
            continue
        for line in lines:
            console.print(escape(line))
    if failed:
        raise typer.Exit(1)
