"""Frames too large for memory, cut into overlapping spatial tiles: each tile its own stream of
steps (its own causal caches), the outputs blended linearly where they overlap, and the decoder's
tiles first shifted in colour to agree with their neighbours (`TileMatch`). Peak memory then
depends on the tile size, not the frame's."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import interrupt
from .model import StreamCache

TILE_OVERLAP = 0.25  # of a tile's side, shared with its neighbour and blended


@dataclass(frozen=True)
class Place:
    """Where a tile's output goes: its box in the output frame, which of its sides border other
    tiles (the key of its blend weights), and the sum of those weights."""
    top: int
    left: int
    height: int
    width: int
    edges: tuple  # (height, width, (top, bottom) inner, (left, right) inner)
    weight: float


@dataclass(frozen=True)
class Overlap:
    """Two tiles' outputs overlapping where both weigh something: where (in the output), and the
    product of their weights there over its sum (`size`), which weighs their means."""
    a: int
    b: int
    rows: slice
    cols: slice
    both: torch.Tensor
    size: float


class TileMatch:
    """Decoded tiles disagree in colour: a frame-norm model's GroupNorm and attention see one tile's
    statistics, not the frame's (benchmarks/README.md, "Tile seams"). This gives each tile's output
    a constant per sample, channel and frame so that all tiles agree best over their overlaps,
    added through the Tiler's linear blend after the last tile (no tile's output is kept: the extra
    memory is a few numbers per tile and overlap).

    Frame by frame, from that frame's tiles alone: a streamed video stays exact and causal, its
    result does not depend on how it is cut into chunks, and a tile's colour cannot jump at a chunk
    boundary. A step whose tiles agree comes out unchanged. Fixed per frame size, like the blend;
    `see` each tile's output in turn, then take the `offsets`."""

    def __init__(self, places: list[Place], overlaps: list[Overlap]):
        self.places, self.overlaps = places, overlaps
        self.of_tile = [[k for k, o in enumerate(overlaps) if i in (o.a, o.b)] for i in range(len(places))]
        self.means: torch.Tensor | None = None  # (overlap, its tile a or b, B, C, T), for the step under way

    @classmethod
    def between(cls, places: list[Place], ramps: dict, ys: list, xs: list, device: torch.device) -> "TileMatch":
        """The overlaps of tiles laid out in rows `ys` by columns `xs` (spans, input units). Pairs
        in the same position relative to the frame's edges share one product of weights, so an 8K
        frame in small tiles holds a few, not one per pair."""
        def overlapping(spans):  # (i, j) of spans that overlap, both orders and i == j
            return [(i, j) for i, a in enumerate(spans) for j, b in enumerate(spans) if a[0] < b[1] and b[0] < a[1]]

        overlaps, both_of = [], {}
        for (i1, i2), (j1, j2) in itertools.product(overlapping(ys), overlapping(xs)):
            a, b = i1 * len(xs) + j1, i2 * len(xs) + j2
            if i1 > i2 or a >= b:
                continue
            pa, pb = places[a], places[b]
            rows = slice(max(pa.top, pb.top), min(pa.top + pa.height, pb.top + pb.height))
            cols = slice(max(pa.left, pb.left), min(pa.left + pa.width, pb.left + pb.width))
            local = (pa.edges, pb.edges, rows.start - pa.top, cols.start - pa.left, rows.start - pb.top,
                     cols.start - pb.left, rows.stop - rows.start, cols.stop - cols.start)
            if local not in both_of:
                _, _, ay, ax, by, bx, n, m = local
                both = ramps[pa.edges][ay:ay + n, ax:ax + m] * ramps[pb.edges][by:by + n, bx:bx + m]
                size = float(both.sum())
                both_of[local] = (_on(both / np.float32(size), device) if size > 0 else None, size)
            both, size = both_of[local]
            if both is not None:
                overlaps.append(Overlap(a, b, rows, cols, both, size))
        return cls(places, overlaps)

    def see(self, i: int, y: torch.Tensor) -> None:
        """Tile i's output (B, C, T, h, w): its weighted mean over each of its overlaps."""
        if i == 0 or self.means is None:  # one block for the step: no small tensor per tile stays
            self.means = y.new_zeros(len(self.overlaps), 2, *y.shape[:3], dtype=torch.float32)
        place = self.places[i]
        for k in self.of_tile[i]:
            o = self.overlaps[k]
            part = y[..., o.rows.start - place.top:o.rows.stop - place.top,
                     o.cols.start - place.left:o.cols.stop - place.left]
            self.means[k, int(i != o.a)] = torch.einsum("bcthw,hw->bct", part.float(), o.both)

    def offsets(self) -> torch.Tensor:
        """(tiles, B, C, T): per tile, sample, channel and frame, the constant that, added to the tile,
        makes the tiles agree best over all their overlaps (least squares, each overlap weighed by
        its size), the frame's weighted mean unchanged. Ends the step: the next `see` starts anew.

        Besides the tiles' constants, one difference per direction (left-right, top-bottom and the
        two diagonals) is fitted and left alone: what the model does to every tile's sides alike
        (where two of the built-in model's tiles overlap one above the other, the lower one comes out
        some 20 levels brighter), which constants per tile could only absorb as a gradient across
        the whole frame. Solved by conjugate gradients on the normal equations: a few index-adds per
        iteration over the overlaps, no matrix."""
        means, self.means = self.means, None
        some = means[0, 0]
        if some.device.type == "meta":  # counting memory: shapes only
            return some.new_zeros(len(self.places), *some.shape)
        n = len(self.places)

        def direction(o: Overlap) -> tuple[int, int]:
            pa, pb = self.places[o.a], self.places[o.b]
            return min(max(pb.top - pa.top, -1), 1), min(max(pb.left - pa.left, -1), 1)

        sides = {k: n + i for i, k in enumerate(sorted({direction(o) for o in self.overlaps}))}
        a = torch.tensor([o.a for o in self.overlaps])
        b = torch.tensor([o.b for o in self.overlaps])
        c = torch.tensor([sides[direction(o)] for o in self.overlaps])
        size = torch.tensor([o.size for o in self.overlaps], dtype=torch.float64)[:, None]
        d = (means[:, 0] - means[:, 1]).flatten(1).cpu().double()

        def normal(e: torch.Tensor) -> torch.Tensor:  # A^T W e: each overlap's weighted misfit to its tiles and side
            e = size * e
            out = torch.zeros(n + len(sides), e.shape[1], dtype=e.dtype)
            return out.index_add_(0, a, e).index_add_(0, b, -e).index_add_(0, c, e)

        def misfit(x: torch.Tensor) -> torch.Tensor:  # A x: per overlap, o_a - o_b + its side's difference
            return x[a] - x[b] + x[c]

        rhs = -normal(d)
        x, r = torch.zeros_like(rhs), rhs.clone()
        p, rr = r.clone(), (r * r).sum(0)
        stop = 1e-12 * (rr + 1e-30)
        for _ in range(min(4 * (n + len(sides)), 4000)):  # conjugate gradients, all columns at once
            if (rr <= stop).all():
                break
            q = normal(misfit(p))
            alpha = rr / (p * q).sum(0).clamp_min(1e-300)
            x += alpha * p
            r -= alpha * q
            rr, old = (r * r).sum(0), rr
            p = r + rr / old.clamp_min(1e-300) * p
        o = x[:n]
        area = torch.tensor([pl.weight for pl in self.places], dtype=torch.float64)[:, None]
        o -= (area * o).sum(0) / area.sum()  # any constant fits as well: keep the frame's mean
        return o.to(some.device, torch.float32).view(n, *some.shape)


class Tiler:
    """Runs a step over overlapping spatial tiles, one stream cache per tile, blended linearly.

    `tile` is the tile side in the step's input units (pixels to encode, latents to decode);
    `scale` is output size over input size (1/8 to encode, 8 to decode).

    The blend itself adds no seam: the weights of overlapping tiles sum to one everywhere, a tile's
    own edge (where its convolutions saw padding) weighs at most 1/(blend+1), and a step that agrees
    on the overlap comes out unchanged (tests/test_stream.py). Seams come from the tiles
    disagreeing, which `match` (on for decoding, `StreamOptions.match_tiles`) removes: `TileMatch`.
    Encoding is not matched: it did not lessen the seams (benchmarks/README.md). One tile (no
    tiling) is never touched.

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
        places, ramps, match = self._geometry(h, w, x.device)
        out = weight = None
        for i, ((y0, y1), (x0, x1)) in enumerate(boxes):
            interrupt.check()  # a tile can take seconds: stop between them when asked
            y = self._step(step, x[..., y0:y1, x0:x1], (y0, x0), final)
            if out is None:  # blended in float32: bf16 weights that should sum to 1 do not
                out = y.new_zeros(*y.shape[:3], round(h * self.scale), round(w * self.scale), dtype=torch.float32)
                weight = out.new_zeros(out.shape[-2:])
            at = places[i]
            assert y.shape[-2:] == (at.height, at.width), (y.shape, at)
            box = (..., slice(at.top, at.top + at.height), slice(at.left, at.left + at.width))
            if match:
                match.see(i, y)
            out[box].addcmul_(y.float(), ramps[i])  # float32 throughout: no mixed-dtype kernel
            weight[box[1:]] += ramps[i]
            if self.on_tile:
                self.on_tile(1 / len(boxes))
        if match and out.shape[2]:  # the blend is linear: each tile's constant added now, weighted
            for at, ramp, offset in zip(places, ramps, match.offsets()):
                out[..., at.top:at.top + at.height, at.left:at.left + at.width].addcmul_(offset[..., None, None], ramp)
        return out.div_(weight).to(y.dtype)

    def _geometry(self, h: int, w: int, device: torch.device) -> tuple[list[Place], list[torch.Tensor], TileMatch | None]:
        """For a frame of h x w (the step's input units): each tile's place in the output, its blend
        weights, and (where tiles are matched and overlap) their `TileMatch`. Fixed per frame size:
        kept for the next step. Tiles in the same position relative to the frame's edges share one
        weight map, so an 8K frame in small tiles holds a few maps, not one per tile."""
        key = (h, w, str(device))
        if self._geometry_of is not None and self._geometry_of[0] == key:
            return self._geometry_of[1]
        ys, xs = self.spans(h), self.spans(w)
        s = self.scale
        ramps: dict = {}
        places = []
        for (y0, y1), (x0, x1) in itertools.product(ys, xs):
            edges = (round((y1 - y0) * s), round((x1 - x0) * s), (y0 > 0, y1 < h), (x0 > 0, x1 < w))
            if edges not in ramps:
                ramps[edges] = self._ramp(*edges)
            places.append(Place(round(y0 * s), round(x0 * s), edges[0], edges[1], edges, float(ramps[edges].sum())))
        match = TileMatch.between(places, ramps, ys, xs, device) if self.match else None
        on_device = {k: _on(r, device) for k, r in ramps.items()}
        geometry = places, [on_device[p.edges] for p in places], match if match and match.overlaps else None
        self._geometry_of = key, geometry
        return geometry

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
