"""Resident memory of reconstructing one photo with the released-size model, as `cvae reconstruct` runs it.

    python benchmarks/photo_rss.py --size 3840x2160            # levers on (the default)
    python benchmarks/photo_rss.py --size 3840x2160 --plain    # Levers.off(): the path before them

Random weights in the released v1.0.0 layout (229 M parameters, clip norm, float32 on the CPU), a
synthetic photo, chunk and tiles chosen by `stream.auto_cut` as the CLI does. Prints the process's
peak resident set (ru_maxrss) after encode and after decode, so the figure includes the weights,
the pixels, the latents and every allocator and oneDNN buffer, not only live tensors.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli.bench import frames_of  # noqa: E402
from cvae_cli.model import CausalVAE, CausalVAEConfig, Levers  # noqa: E402
from cvae_cli.stream import StreamOptions, auto_cut, decode_latents, encode_frames  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="3840x2160", help="WxH")
    ap.add_argument("--plain", action="store_true", help="Levers.off()")
    ap.add_argument("--width", type=int, default=128, help="hidden_size (128 = released)")
    args = ap.parse_args(argv)
    w, h = map(int, args.size.lower().split("x"))
    torch.manual_seed(0)
    model = CausalVAE(CausalVAEConfig(hidden_size=args.width)).eval()
    if args.plain:
        model.use_levers(Levers.off())
    chunk, tile = auto_cut(w, h)
    opts = StreamOptions(chunk=chunk, tile=tile)
    photo = frames_of(1, w, h)
    print(f"# {w}x{h}, tile {tile}, {'plain' if args.plain else 'levers'}; after loading: {peak_gib():.2f} GiB", flush=True)
    start = time.perf_counter()
    mean = torch.cat([m for m, _ in encode_frames(model, photo, opts)], 1)
    print(f"encode: peak RSS {peak_gib():.2f} GiB ({time.perf_counter() - start:.0f} s)", flush=True)
    frames = np.concatenate(list(decode_latents(model, [mean], opts, h, w)))
    assert frames.shape == (1, h, w, 3)
    print(f"decode: peak RSS {peak_gib():.2f} GiB ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
