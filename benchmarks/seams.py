"""Tile seams on a real photo: PSNR in a band around every tile edge against the rest of the image.

    python benchmarks/seams.py PHOTO --tile 128 [--crop x0,y0,x1,y1] [--weights W] [--overlap 0.25]

Reconstructs the photo whole and in tiles (`StreamOptions(tile=...)`, encode and decode) with the
built-in model (or W), the decoder's tiles matched in colour (`match_tiles`, the default) and not,
and prints PSNR against the source in the band (3 pixels either side of each inner tile edge) and in
the rest, for each. Tiles leave a seam where the tiled band falls behind the
rest by more than the untiled one does (content alone makes the band differ). Also the tiled result
against the whole one, band and rest: where tiling changes the output.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli import tiles  # noqa: E402
from cvae_cli.checkpoints import builtin_weights, load_model  # noqa: E402
from cvae_cli.stream import StreamOptions, decode_latents, encode_frames  # noqa: E402
from cvae_cli.tiles import Tiler  # noqa: E402

BAND = 3  # pixels either side of a tile edge


def band_mask(height: int, width: int, tile: int, overlap: float) -> np.ndarray:
    """True within BAND pixels of an inner edge of the encoder's pixel tiles."""
    tiler = Tiler(tile, 1 / 8, False, overlap)
    mask = np.zeros((height, width), bool)
    for size, axis in ((height, 0), (width, 1)):
        spans = tiler.spans(size)
        for (_, a1), (b0, _) in zip(spans, spans[1:]):
            for edge in (b0, a1):
                index = slice(max(edge - BAND, 0), edge + BAND)
                mask[(index, slice(None)) if axis == 0 else (slice(None), index)] = True
    return mask


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return 10 * math.log10(255**2 / np.mean((a.astype(np.float64) - b)[where] ** 2))


def reconstruct(model, image: np.ndarray, tile: int | None, overlap: float, match: bool = True) -> np.ndarray:
    h, w = image.shape[:2]
    options = StreamOptions(chunk=4, tile=tile, match_tiles=match)
    tiles.TILE_OVERLAP = overlap  # the overlap under test, for encode and decode
    mean = torch.cat([m for m, _ in encode_frames(model, [image], options)], 1)
    return np.concatenate(list(decode_latents(model, [mean], options, h, w)))[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photo")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--crop", help="x0,y0,x1,y1")
    ap.add_argument("--weights", default=str(builtin_weights()))
    args = ap.parse_args(argv)
    image = np.array(Image.open(args.photo).convert("RGB"))
    if args.crop:
        x0, y0, x1, y1 = map(int, args.crop.split(","))
        image = image[y0:y1, x0:x1]
    image = np.ascontiguousarray(image[: image.shape[0] // 8 * 8, : image.shape[1] // 8 * 8])
    model = load_model(args.weights)
    h, w = image.shape[:2]
    band = band_mask(h, w, args.tile, args.overlap)
    whole = reconstruct(model, image, None, args.overlap)
    wb, wr = psnr(image, whole, band), psnr(image, whole, ~band)
    print(f"{Path(args.photo).name} {w}x{h}, tile {args.tile}, overlap {args.overlap}, band {band.mean():.0%}")
    print(f"  whole: band {wb:.2f} dB, rest {wr:.2f} dB ({wb - wr:+.2f})")
    for match in (False, True):
        tiled = reconstruct(model, image, args.tile, args.overlap, match)
        tb, tr = psnr(image, tiled, band), psnr(image, tiled, ~band)
        name = "tiled, matched" if match else "tiled, plain"
        print(f"  {name}: band {tb:.2f} dB, rest {tr:.2f} dB ({tb - tr:+.2f});"
              f" seam drop {(tb - tr) - (wb - wr):+.2f} dB; against whole: band {psnr(whole, tiled, band):.2f} dB, rest {psnr(whole, tiled, ~band):.2f} dB")


if __name__ == "__main__":
    main()
