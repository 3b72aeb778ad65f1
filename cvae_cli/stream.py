"""Model + frame iterator -> latent chunks, and back: chunking, causal caches, windows.

Three ways to cut a video in time, all producing the same number of latents:
- "stream": chunks of 1 + c frames, then c frames, with every causal layer's cache carried across
  chunks. Exact (to float rounding) for frame-norm models with per-frame attention.
- "window": Open-Sora-Plan v1.1.0's windows of 65 frames overlapping by one, each encoded as a new
  clip, each later window's first latent dropped (and the mirror image on decode).
- "whole": the clip in one piece; memory grows with its length. The reference for the others.
Frames too large for memory are cut into overlapping spatial tiles (`tiles.Tiler`). Peak memory
depends on the chunk and tile size, not the length.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import interrupt
from .device import placement
from .model import CausalVAE, CausalVAEConfig, StreamCache
from .model.slices import frame_local
from .tiles import Tiler

MODES = ("stream", "window", "whole")
DEFAULT_CHUNK = 16  # frames per chunk after the first, at most (`auto_cut` shortens it for large frames)
WINDOW_FRAMES = 65  # Open-Sora-Plan v1.1.0's temporal window: 17 latents


@dataclass(frozen=True)
class StreamOptions:
    """How a video is cut for the model. `chunk` counts frames after the first chunk's extra one.
    The device and dtype are the model's own."""

    mode: str = "stream"
    chunk: int = DEFAULT_CHUNK
    tile: int | None = None  # pixel tile side (multiple of 32); None keeps whole frames
    match_tiles: bool = True  # decoding in tiles: shift each tile's colour to agree with its neighbours (`Tiler`)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.chunk < 4 or self.chunk % 4:
            raise ValueError(f"chunk must be a positive multiple of 4 frames, not {self.chunk}")
        if self.tile is not None and (self.tile < 64 or self.tile % 32):
            raise ValueError(f"tile must be a multiple of 32 pixels, at least 64, not {self.tile}")


TILE_ABOVE = 1920 * 1088  # larger frames get tiles when tiling is left to us (a video: see choose_options)
AUTO_TILE = 512
CHUNK_PIXELS = 4 * 1280 * 720  # pixels x frames per chunk: 4 frames of 720p, 16 of 360p


def auto_cut(width: int, height: int, chunk: int | None = None, tile: int | str | None = "auto") -> tuple[int, int | None]:
    """(chunk frames, tile side) for a frame size where the user left them open (None / "auto"):
    tiles only past 1080p, chunks as long as the pixel budget allows, 4 to 16 frames."""
    if tile == "auto":
        tile = AUTO_TILE if width * height > TILE_ABOVE else None
    if chunk is None:
        area = min(tile or width, width) * min(tile or height, height)
        chunk = max(4, min(DEFAULT_CHUNK, CHUNK_PIXELS // area // 4 * 4))
    return chunk, tile


WINDOW_TILE = 256  # Open-Sora-Plan v1.1.0's spatial tile


@functools.lru_cache(maxsize=16)
def _exact_streaming(config_json: str) -> bool:
    with torch.device("meta"):  # the modules, not their weights
        model = CausalVAE(CausalVAEConfig.from_dict(json.loads(config_json)))
    return frame_local(model)


def exact_streaming(config: CausalVAEConfig) -> bool:
    """Whether streamed chunks equal the whole clip: the model is frame-local (`model.slices.frame_local`,
    the one rule: per-frame norm and per-frame attention)."""
    return _exact_streaming(config.to_json())


def choose_options(config: CausalVAEConfig, width: int, height: int, mode: str = "auto",
                   chunk: int | None = None, tile: int | str | None = "auto", image: bool = False) -> StreamOptions:
    """The cut for a frame size (and whether the input is one image), where the user left it open,
    by fixed sizes, for a caller without a memory budget; the commands choose by the exact count
    against a budget instead (`budget.Policy`):
    mode `auto` streams a model that streams exactly and cuts any other (the released clip-norm
    checkpoints) as Open-Sora-Plan does, in 65-frame windows overlapping by one, with its 256-pixel
    tiles where a window's pixels exceed the chunk budget.

    Tiles past 1080p (`auto_cut`) are for images and cuts that keep no state between chunks. A video
    streamed exactly keeps whole frames: every tile would keep its own causal caches, over 1.7x the
    frame's pixels, so with the model's slices on (`Levers`, the default) a tiled video peaks higher
    than an untiled one (benchmarks/README.md), and tiles blend seams into a result that is otherwise
    exact. ValueError for a cut StreamOptions refuses."""
    if mode == "auto":
        mode = "stream" if exact_streaming(config) else "window"
    if mode == "window" and tile == "auto":
        tile = WINDOW_TILE if width * height * WINDOW_FRAMES > CHUNK_PIXELS else None
    if mode == "stream" and tile == "auto" and exact_streaming(config) and not image:
        tile = None
    chunk, tile = auto_cut(width, height, chunk, tile)
    return StreamOptions(mode=mode, chunk=chunk, tile=tile)


def padded_length(frames: int, factor: int = 4) -> int:
    """The causal length 1 + factor*k that holds `frames` frames."""
    return 1 + factor * math.ceil(max(frames - 1, 0) / factor)


def padded_size(size: int, factor: int = 8) -> int:
    return factor * math.ceil(size / factor)


def pad_frames(frames: Iterable[np.ndarray], factor: int) -> Iterator[np.ndarray]:
    """Repeat the last frame so the count becomes 1 + factor*k."""
    n, last = 0, None
    for n, last in enumerate(frames, 1):
        yield last
    if last is not None:
        yield from itertools.repeat(last, padded_length(n, factor) - n)


def groups(items: Iterable, first: int, size: int, overlap: int = 0) -> Iterator[tuple[list, bool]]:
    """Cut a stream into (list, is_last): `first` items, then `size` new items each time, each list
    beginning with the last `overlap` items of the one before. Looks one list ahead to know the last."""
    it = iter(items)
    current = list(itertools.islice(it, first))
    while current:
        more = list(itertools.islice(it, size))
        yield current, not more
        current = current[len(current) - overlap:] + more if more else []


def plan(options: StreamOptions, factor: int, latent: bool) -> tuple[int, int, int]:
    """(first, size, overlap) of the time groups for a mode, in frames or (latent=True) latents."""
    if options.mode == "whole":
        return (2**62, 1, 0)
    if options.mode == "window":
        first = (WINDOW_FRAMES - 1) // factor + 1 if latent else WINDOW_FRAMES
        return (first, first - 1, 1)
    size = options.chunk // factor if latent else options.chunk
    return (1 + size, size, 0)


def to_pixels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float32 pixels (3, T, H, W) in [-1, 1]: the model's input scale,
    set here once (one rounding)."""
    return torch.as_tensor(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> uint8 of the same layout, rounded and clipped as a written frame is."""
    return x.float().add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def frames_to_pixels(frames: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype,
                     factor: int = 8) -> torch.Tensor:
    """uint8 (H, W, 3) frames -> (1, 3, T, H', W') in [-1, 1] on the device, edges repeated to
    multiples of `factor`. Upload as uint8 (4x less traffic), convert on the device."""
    x = torch.from_numpy(np.stack(frames))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    return uint8_to_pixels(x, device, dtype, factor)


def uint8_to_pixels(x: torch.Tensor, device: torch.device, dtype: torch.dtype, factor: int = 8) -> torch.Tensor:
    """uint8 (T, H, W, 3) on the device -> (1, 3, T, H', W') in [-1, 1] (what `budget` counts too)."""
    x = to_pixels(x).unsqueeze(0).to(dtype)
    h, w = x.shape[-2:]
    pad = (0, padded_size(w, factor) - w, 0, padded_size(h, factor) - h, 0, 0)
    return F.pad(x, pad, mode="replicate") if any(pad) else x


def pixels_to_uint8(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, 3, T, H', W') in [-1, 1] -> uint8 (T, height, width, 3) on x's device, padding cropped."""
    return to_uint8(x[0, :, :, :height, :width]).permute(1, 2, 3, 0)  # x stays the caller's


def pixels_to_frames(x: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(1, 3, T, H', W') in [-1, 1] -> uint8 (T, height, width, 3) on the CPU, padding cropped."""
    return pixels_to_uint8(x, height, width).cpu().numpy()


def lockstep(sources: list[Iterator[tuple[torch.Tensor, bool]]], tiler: Tiler,
             step: Callable) -> Iterator[tuple[int, torch.Tensor]]:
    """Run several streams' chunks (each (1, C, T, h, w), is_last) stacked along the batch while their
    chunks agree in length and lastness; yield (stream index, output (1, ...)) step by step.

    Streams that part ways (a shorter or final chunk, an exhausted input) carry on with their own
    rows of the caches, so every stream computes what it would alone: the model is per-sample."""
    cohorts = [(list(range(len(sources))), tiler)]
    while cohorts:
        later = []
        for members, tiler in cohorts:
            interrupt.check()  # between chunks
            items = [(k, next(sources[i], None)) for k, i in enumerate(members)]
            keys = {k: (item[0].shape[2], item[1]) for k, item in items if item is not None}
            for key in sorted(set(keys.values())):
                rows = [k for k, v in keys.items() if v == key]
                sub = tiler if len(rows) == len(members) else tiler.select(rows)
                y = sub.run(step, torch.cat([items[k][1][0] for k in rows]), key[1])
                for k, out in zip(rows, y.split(1)):
                    yield members[k], out
                if not key[1]:
                    later.append(([members[k] for k in rows], sub))
        cohorts = later


def encode_step(model: CausalVAE) -> Callable[[torch.Tensor, StreamCache | None], torch.Tensor]:
    """One step of encoding, a (tile of a) chunk of pixels to its moments (mean and logvar stacked)."""
    def step(x: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
        post = model.encode(x, cache)
        return torch.cat([post.mean, post.logvar], dim=1)
    return step


def decode_step(model: CausalVAE) -> Callable[[torch.Tensor, StreamCache | None], torch.Tensor]:
    """One step of decoding, a (tile of a) chunk of latents to pixels."""
    def step(z: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
        return model.decode(z, cache)
    return step


@torch.inference_mode()
def encode_batch(model: CausalVAE, clips: Sequence[Iterable[np.ndarray]], options: StreamOptions,
                 on_tile: Callable[[float], None] | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Encode clips of one frame size together, their chunks stacked along the batch (one model call
    per step for all of them); yield (clip index, mean, logvar) chunks as `encode_frames` does.
    `on_tile` as `Tiler`'s."""
    ft, fs = model.config.time_compression, model.config.space_compression
    device, dtype = placement(model)
    first, size, overlap = plan(options, ft, latent=False)
    sources = [((frames_to_pixels(group, device, dtype, fs), last)
                for group, last in groups(pad_frames(frames, ft), first, size, overlap))
               for frames in clips]

    seen = [0] * len(clips)
    tiler = Tiler(options.tile, 1 / fs, options.mode == "stream", on_tile=on_tile)
    for i, moments in lockstep(sources, tiler, encode_step(model)):
        moments = moments[0, :, overlap:] if overlap and seen[i] else moments[0]
        seen[i] += 1
        yield (i, *moments.chunk(2, dim=0))


def encode_frames(model: CausalVAE, frames: Iterable[np.ndarray], options: StreamOptions,
                  on_tile: Callable[[float], None] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (mean, logvar) latent chunks, each (C, t, h, w), as the frames stream in.

    The frame count is padded to 1 + 4k by repeating the last frame."""
    for _, mean, logvar in encode_batch(model, [frames], options, on_tile):
        yield mean, logvar


@torch.inference_mode()
def decode_batch(model: CausalVAE, latents: Sequence[Iterable[torch.Tensor]], options: StreamOptions,
                 height: int, width: int, on_tile: Callable[[float], None] | None = None,
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """Decode several latent streams of one size together (chunks stacked along the batch); yield
    (stream index, uint8 frames (t, height, width, 3)) as `decode_latents` does. `on_tile` as `Tiler`'s."""
    ft, fs = model.config.time_compression, model.config.space_compression
    device, dtype = placement(model)
    first, size, overlap = plan(options, ft, latent=True)
    streaming = options.mode == "stream"

    def source(chunks):
        steps = (t for chunk in chunks for t in chunk.unbind(1))
        for n, (group, last) in enumerate(groups(steps, first, size, overlap)):
            z = torch.stack(group, dim=1).unsqueeze(0).to(device, dtype)
            if last and streaming and (n or len(group) > 1):  # the last chunk as any other, then an
                yield z, False           # empty one that flushes what the decoder held back: two steps
                yield z[:, :, :0], True  # of the usual size, not one twice as large (the peak of a
            else:                        # streamed decode). A lone latent (an image) holds nothing back.
                yield z, last

    seen = [0] * len(latents)
    tiler = Tiler(options.tile and options.tile // fs, fs, streaming=streaming, match=options.match_tiles,
                  on_tile=on_tile)
    for i, x in lockstep([source(c) for c in latents], tiler, decode_step(model)):
        x = x[:, :, overlap:] if overlap and seen[i] else x
        seen[i] += 1
        if x.shape[2]:
            yield i, pixels_to_frames(x, height, width)


def decode_latents(model: CausalVAE, latents: Iterable[torch.Tensor], options: StreamOptions,
                   height: int, width: int, on_tile: Callable[[float], None] | None = None) -> Iterator[np.ndarray]:
    """Yield uint8 frame chunks (t, height, width, 3) from latent chunks (C, t', h, w), as they come.

    The decoder looks one latent ahead, so a chunk's last frames come out with the next chunk."""
    for _, frames in decode_batch(model, [latents], options, height, width, on_tile):
        yield frames
