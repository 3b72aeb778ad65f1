"""Model + frame iterator -> latent chunks, and back: chunking, causal caches, tiling.

Three ways to cut a video in time, all producing the same number of latents:
- "stream": chunks of 1 + c frames, then c frames, with every causal layer's cache carried across
  chunks. Exact (to float rounding) for frame-norm models with per-frame attention.
- "window": Open-Sora-Plan v1.1.0's windows of 65 frames overlapping by one, each encoded as a new
  clip, each later window's first latent dropped (and the mirror image on decode).
- "whole": the clip in one piece; memory grows with its length. The reference for the others.
Frames too large for memory are cut into overlapping spatial tiles, each with its own caches, and
blended linearly where they overlap, the decoder's tiles first shifted in colour to agree with their
neighbours. Peak memory depends on the chunk and tile size, not the length.
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


TILE_OVERLAP = 0.25  # of a tile's side, shared with its neighbour and blended


class Tiler:
    """Runs a step over overlapping spatial tiles, one stream cache per tile, blended linearly.

    `tile` is the tile side in the step's input units (pixels to encode, latents to decode);
    `scale` is output size over input size (1/8 to encode, 8 to decode).

    The blend itself adds no seam: the weights of overlapping tiles sum to one everywhere, a tile's
    own edge (where its convolutions saw padding) weighs at most 1/(blend+1), and a step that agrees
    on the overlap comes out unchanged (tests/test_stream.py). Seams come from the tiles
    disagreeing: a frame-norm model's GroupNorm and attention see one tile's statistics, not the
    frame's, so each tile comes out with its own colour (benchmarks/README.md, "Tile seams").

    `match` (on for decoding, `StreamOptions.match_tiles`) removes that: each tile's output gets a
    constant per sample, channel and frame, chosen so that all tiles agree best over their
    overlaps (`_offsets`), added through the same linear blend after the last tile (so no tile's
    output is kept: the extra memory is a few numbers per tile and overlap). Frame by frame, from
    that frame's tiles alone: a streamed video stays exact and causal, its result does not depend
    on how it is cut into chunks, and a tile's colour cannot jump at a chunk boundary. Encoding is
    not matched: it did not lessen the seams (benchmarks/README.md). A step whose tiles agree
    comes out unchanged with or without it; one tile (no tiling) is never touched.

    `on_tile(fraction)`, if given, is called after each tile of a tiled step with the part of that
    step it stood for: a large photo is one step of minutes, and its progress moves by tiles."""

    def __init__(self, tile: int | None, scale: float, streaming: bool, overlap: float | None = None,
                 match: bool = False, on_tile: Callable[[float], None] | None = None):
        overlap = TILE_OVERLAP if overlap is None else overlap
        self.tile, self.scale, self.streaming, self.overlap, self.match = tile, scale, streaming, overlap, match
        self.on_tile = on_tile
        self.align = round(1 / scale) if scale < 1 else 1  # tile corners on whole latents
        self.caches: dict[tuple[int, int], StreamCache] = {}
        self._geometry_of: tuple | None = None  # (frame size and device, what `_geometry` worked out for it)

    def spans(self, size: int) -> list[tuple[int, int]]:
        if self.tile is None or size <= self.tile:
            return [(0, size)]
        stride = max(self.align, int(self.tile * (1 - self.overlap)) // self.align * self.align)
        return [(s, s + self.tile) for s in list(range(0, size - self.tile, stride)) + [size - self.tile]]

    def run(self, step: Callable, x: torch.Tensor, final: bool) -> torch.Tensor:
        """`step(x_tile, cache)` maps (B, C, T, h, w) to (B, C', T', h*scale, w*scale)."""
        h, w = x.shape[-2:]
        boxes = list(itertools.product(self.spans(h), self.spans(w)))
        if len(boxes) == 1:
            return self._step(step, x, (0, 0), final)
        places, ramps, pairs = self._geometry(h, w, x.device)
        means = None  # (pair, its first or second tile, B, C, T): each tile's mean over each of its overlaps
        out = weight = None
        for i, ((y0, y1), (x0, x1)) in enumerate(boxes):
            interrupt.check()  # a tile can take seconds: stop between them when asked
            y = self._step(step, x[..., y0:y1, x0:x1], (y0, x0), final)
            if out is None:  # blended in float32: bf16 weights that should sum to 1 do not
                out = y.new_zeros(*y.shape[:3], round(h * self.scale), round(w * self.scale), dtype=torch.float32)
                weight = out.new_zeros(out.shape[-2:])
                means = out.new_zeros(len(pairs), 2, *y.shape[:3])  # one block: no small tensor per tile stays
            oy, ox, hh, ww = places[i][:4]
            assert y.shape[-2:] == (hh, ww), (y.shape, places[i])
            for k in places[i][4]:
                (sy, sx), both = pairs[k][2:4]
                sub = (..., slice(sy.start - oy, sy.stop - oy), slice(sx.start - ox, sx.stop - ox))
                means[k, int(i != pairs[k][0])] = torch.einsum("bcthw,hw->bct", y[sub].float(), both)
            out[..., oy:oy + hh, ox:ox + ww].addcmul_(y.float(), ramps[i])  # float32 throughout: no mixed-dtype kernel
            weight[oy:oy + hh, ox:ox + ww] += ramps[i]
            if self.on_tile:
                self.on_tile(1 / len(boxes))
        if pairs and out.shape[2]:  # the blend is linear: each tile's constant added now, weighted
            for (oy, ox, hh, ww, *_), ramp, offset in zip(places, ramps, self._offsets(places, pairs, means)):
                out[..., oy:oy + hh, ox:ox + ww].addcmul_(offset[..., None, None], ramp)
        return out.div_(weight).to(y.dtype)

    def _geometry(self, h: int, w: int, device: torch.device) -> tuple[list, list[torch.Tensor], list]:
        """For a frame of h x w (the step's input units): each tile's place in the output (top, left,
        height, width, the pairs it is in, the sum of its weights), its blend weights, and (where
        tiles are matched) every two tiles whose outputs overlap where both weigh something: (a, b,
        (rows, cols) of the overlap in the output, the product of their weights there over its sum,
        that sum). Fixed per frame size: kept for the next step. Tiles in the same position relative
        to the frame's edges share one weight map, and pairs in the same relative position one
        product, so an 8K frame in small tiles holds a few maps, not one per tile."""
        key = (h, w, str(device))
        if self._geometry_of is not None and self._geometry_of[0] == key:
            return self._geometry_of[1]
        ys, xs = self.spans(h), self.spans(w)
        s = self.scale
        ramp_of: dict = {}
        places, ramps = [], []
        for (y0, y1), (x0, x1) in itertools.product(ys, xs):
            shape = (round((y1 - y0) * s), round((x1 - x0) * s), (y0 > 0, y1 < h), (x0 > 0, x1 < w))
            if shape not in ramp_of:
                ramp_of[shape] = self._ramp(*shape)
            places.append((round(y0 * s), round(x0 * s), shape[0], shape[1], [], float(ramp_of[shape].sum()), shape))
            ramps.append(ramp_of[shape])

        def overlapping(spans):  # (i, j) of spans that overlap, both orders and i == j
            return [(i, j) for i, a in enumerate(spans) for j, b in enumerate(spans) if a[0] < b[1] and b[0] < a[1]]

        pairs, both_of = [], {}
        for (i1, i2), (j1, j2) in itertools.product(overlapping(ys) if self.match else [], overlapping(xs)):
            a, b = i1 * len(xs) + j1, i2 * len(xs) + j2
            if i1 > i2 or a >= b:
                continue
            (ay, ax, ah, aw, *_), (by, bx, bh, bw, *_) = places[a], places[b]
            sy, sx = slice(max(ay, by), min(ay + ah, by + bh)), slice(max(ax, bx), min(ax + aw, bx + bw))
            local = (places[a][6], places[b][6], sy.start - ay, sx.start - ax, sy.start - by, sx.start - bx,
                     sy.stop - sy.start, sx.stop - sx.start)
            if local not in both_of:
                ra, rb = ramp_of[local[0]], ramp_of[local[1]]
                rows, cols = local[6], local[7]
                both = (ra[local[2]:local[2] + rows, local[3]:local[3] + cols]
                        * rb[local[4]:local[4] + rows, local[5]:local[5] + cols])
                total = float(both.sum())
                both_of[local] = (_on(both / np.float32(total), device) if total > 0 else None, total)
            both, total = both_of[local]
            if both is not None:
                places[a][4].append(len(pairs))
                places[b][4].append(len(pairs))
                pairs.append((a, b, (sy, sx), both, total))
        on_device = {k: _on(r, device) for k, r in ramp_of.items()}
        geometry = places, [on_device[p[6]] for p in places], pairs
        self._geometry_of = key, geometry
        return geometry

    @staticmethod
    def _offsets(places: list, pairs: list, means: torch.Tensor) -> torch.Tensor:
        """(tiles, B, C, T): per tile, sample, channel and frame, the constant that, added to the tile,
        makes the tiles agree best over all their overlaps (least squares, each overlap weighed by
        its size), the frame's weighted mean unchanged.

        Besides the tiles' constants, one difference per direction (left-right, top-bottom and the
        two diagonals) is fitted and left alone: what the model does to every tile's sides alike
        (where two of the built-in model's tiles overlap one above the other, the lower one comes out
        some 20 levels brighter), which constants per tile could only absorb as a gradient across
        the whole frame. Solved by conjugate gradients on the normal equations: a few index-adds per
        iteration over the pairs, no matrix."""
        some = means[0, 0]
        if some.device.type == "meta":  # counting memory: shapes only
            return some.new_zeros(len(places), *some.shape)
        n = len(places)
        a = torch.tensor([p[0] for p in pairs])
        b = torch.tensor([p[1] for p in pairs])
        side = {(min(max(places[q][0] - places[p][0], -1), 1), min(max(places[q][1] - places[p][1], -1), 1))
                for p, q, *_ in pairs}
        side = {k: n + i for i, k in enumerate(sorted(side))}
        c = torch.tensor([side[min(max(places[q][0] - places[p][0], -1), 1),
                               min(max(places[q][1] - places[p][1], -1), 1)] for p, q, *_ in pairs])
        size = torch.tensor([p[4] for p in pairs], dtype=torch.float64)[:, None]
        d = (means[:, 0] - means[:, 1]).flatten(1).cpu().double()

        def normal(e: torch.Tensor) -> torch.Tensor:  # A^T W e: each pair's weighted misfit to its tiles and side
            e = size * e
            out = torch.zeros(n + len(side), e.shape[1], dtype=e.dtype)
            return out.index_add_(0, a, e).index_add_(0, b, -e).index_add_(0, c, e)

        def misfit(x: torch.Tensor) -> torch.Tensor:  # A x: per pair, o_a - o_b + its side's difference
            return x[a] - x[b] + x[c]

        rhs = -normal(d)
        x, r = torch.zeros_like(rhs), rhs.clone()
        p, rr = r.clone(), (r * r).sum(0)
        stop = 1e-12 * (rr + 1e-30)
        for _ in range(min(4 * (n + len(side)), 4000)):  # conjugate gradients, all columns at once
            if (rr <= stop).all():
                break
            q = normal(misfit(p))
            alpha = rr / (p * q).sum(0).clamp_min(1e-300)
            x += alpha * p
            r -= alpha * q
            rr, old = (r * r).sum(0), rr
            p = r + rr / old.clamp_min(1e-300) * p
        o = x[:n]
        area = torch.tensor([pl[5] for pl in places], dtype=torch.float64)[:, None]
        o -= (area * o).sum(0) / area.sum()  # any constant fits as well: keep the frame's mean
        return o.to(some.device, torch.float32).view(n, *some.shape)

    def _step(self, step: Callable, x: torch.Tensor, key: tuple[int, int], final: bool) -> torch.Tensor:
        """One tile's step; a tile's caches go as soon as its stream has ended."""
        y = step(x, self._cache(key, final))
        if final:
            self.caches.pop(key, None)
        return y

    def select(self, index: list[int]) -> "Tiler":
        """A tiler carrying only some batch rows' caches (clips of a batch that go on together)."""
        out = Tiler(self.tile, self.scale, self.streaming, self.overlap, self.match, self.on_tile)
        out.caches = {k: c.select(index) for k, c in self.caches.items()}
        return out

    def _cache(self, key: tuple[int, int], final: bool) -> StreamCache | None:
        if not self.streaming:
            return None
        cache = self.caches.setdefault(key, StreamCache())
        cache.final = final
        return cache

    def _ramp(self, height: int, width: int, inner_y: tuple[bool, bool], inner_x: tuple[bool, bool]) -> np.ndarray:
        """Weights rising linearly across the overlap on every edge that borders another tile (float32,
        on the host: their sums are worked out here, with no value read back from the device)."""
        blend = max(1, round(self.tile * self.scale * self.overlap))

        def axis(n: int, inner: tuple[bool, bool]) -> np.ndarray:
            r = np.ones(n, np.float32)
            k = min(blend, n)
            up = np.arange(1, k + 1, dtype=np.float32) / np.float32(k + 1)
            if inner[0]:
                r[:k] = np.minimum(r[:k], up)
            if inner[1]:
                r[n - k:] = np.minimum(r[n - k:], up[::-1])
            return r

        return axis(height, inner_y)[:, None] * axis(width, inner_x)[None, :]


def _on(weights: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(weights)).to(device)


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
