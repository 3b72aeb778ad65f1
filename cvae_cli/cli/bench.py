"""`cvae bench`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import command
from .options import Device, Dtype, Weights


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
    """Frames/s, peak memory beside its exact count, GFLOP per frame and TFLOP/s, on this machine
    (random weights of a released layout unless --weights: nothing is downloaded).

    Examples:

    ```
        cvae bench                                     # v1.0.0 layout, 17 frames of 720p, bf16 on a GPU
        cvae bench --size 1280x720 --frames 17 --dtype bf16 --compare --json bench.json
        cvae bench --config v1.1.0 --size 512x512 --frames 9 --device cpu --repeat 1
    ```
    """
    from ..bench import COMPARE, BenchOptions, bench as measure, parse_size

    width, height = parse_size(size)
    measure(BenchOptions(weights=weights, config=config, width=width, height=height, frames=frames, chunk=chunk,
                         dtype=dtype, device=device, variants=COMPARE if compare else ("default",), repeat=repeat),
            json_out, say=typer.echo)
