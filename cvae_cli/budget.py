"""How much memory a cut of the model needs, counted exactly, and the cut that fits a budget.

`LiveTensorBytes` adds up every tensor alive at once, op by op. The model runs on the meta device:
shapes only, no arithmetic and no memory, while every op still makes its outputs as it would on a
real device, so a 4K count takes about a second and does not depend on how busy the machine is
(on the CPU the same count gives the same bytes: tests/test_levers.py). Steps run as `stream`
runs them: the same step functions, the same `Tiler`, the same pixel conversions. It sees the
model's own tensors (activations, causal caches, inputs, outputs, blend buffers); the backend's
copies of one convolution's input and output come on top (cuDNN's on a GPU, oneDNN's blocked-layout
copies on the CPU: measured in benchmarks/README.md), which `Count.peak` adds.

Tiles of one shape run the same ops on tensors of the same shapes, so one tile's step is counted
and replayed for the others (`_Replay`): a tiled count costs what an untiled one does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import CvaeError
from .model import CausalVAE, CausalVAEConfig, Levers, StreamCache
from .stream import (WINDOW_FRAMES, StreamOptions, decode_step, encode_step, padded_length, padded_size,
                     pixels_to_uint8, plan, uint8_to_pixels)
from .tiles import Tiler

GIB = 2**30
TILES = (1024, 768, 512, 384, 256, 192, 128)  # tile sides tried, largest first
CHUNKS = (16, 12, 8, 4)  # stream chunk lengths tried, longest first
DIRECTIONS = ("encode", "decode", "reconstruct")


# --- the count ---------------------------------------------------------------------------------

class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once, counted exactly: every op's outputs are tracked
    until the last tensor viewing their storage is garbage. Tensors made before entering (the
    weights) are not counted. Any device, the meta device included (storages are told apart by
    identity, not by address: meta storages have none). `conv` is the largest input plus output of
    one convolution (what cuDNN and oneDNN copy). With `explain`, `at_peak` names the op that made the peak
    and the shapes of the largest storages alive then."""

    def __init__(self, explain: bool = False):
        super().__init__()
        self.explain = explain
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.shapes: dict[int, tuple] = {}
        self.live = self.peak = self.conv = 0
        self.at_peak: tuple[str, list[tuple[int, tuple]]] = ("", [])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("conv"):  # conv2d, conv3d, conv_transpose3d, ...
            self.conv = max(self.conv, _nbytes(args[0]) + _nbytes(out))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, storage.nbytes()
                    if self.explain:
                        self.shapes[key] = tuple(t.shape)
                    self.live += self.sizes[key]
                    if self.live > self.peak:
                        self.peak = self.live
                        if self.explain:
                            self.at_peak = (str(func), sorted(((self.sizes[k], self.shapes[k]) for k in self.sizes),
                                                              key=lambda s: -s[0])[:8])
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key)
        return out

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]
            self.shapes.pop(key, None)


_group_norm = F.group_norm


def _meta_group_norm(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """On the meta device, what a CPU or GPU group norm allocates (its output, and the per-group
    mean and rstd it returns beside it), without the Python decomposition that is the meta
    kernel: that took most of a count's time, and holds temporaries no real kernel makes.
    tests/test_levers.py checks the count against the CPU's. Other devices: the real function."""
    if x.device.type != "meta":
        return _group_norm(x, num_groups, weight, bias, eps)
    stats = (x.new_empty((x.shape[0], num_groups)), x.new_empty((x.shape[0], num_groups)))
    del stats
    return torch.empty_like(x)


@contextlib.contextmanager
def _fast_meta_norms():
    F.group_norm = _meta_group_norm
    try:
        yield
    finally:
        F.group_norm = _group_norm


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _leaves(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _leaves(v)] if isinstance(value, (tuple, list)) else []


def cache_bytes(tiler: Tiler) -> int:
    """Bytes of every causal cache that the tiles (or the one whole frame) keep between steps."""
    return sum(_nbytes(t) for c in tiler.caches.values() for v in c.state.values() for t in _leaves(v))


class _Replay:
    """A Tiler step that runs the model once per distinct (input shape, cache shapes, final) and
    replays it for the other tiles: the peak it reached above what was alive before, then fresh
    tensors of the output's and the new caches' shapes. Exact while no output or cache shares a
    storage with anything else (checked: such a step always runs for real)."""

    def __init__(self, counter: LiveTensorBytes, step: Callable):
        self.counter, self.step = counter, step
        self.seen: dict = {}

    @staticmethod
    def _signature(v):
        """Shapes, strides and dtypes, and whether each tensor owns its storage: a cache that is a
        view of a larger tensor frees nothing when the step replaces it, one that owns it does."""
        if isinstance(v, torch.Tensor):
            return (tuple(v.shape), v.stride(), v.dtype, _nbytes(v) == v.untyped_storage().nbytes())
        return tuple(map(_Replay._signature, v)) if isinstance(v, (tuple, list)) else v

    def __call__(self, x: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
        state = None if cache is None else tuple(sorted((k, self._signature(v)) for k, v in cache.state.items()))
        key = (self._signature(x), x.is_contiguous(), state,
               None if cache is None else cache.final)
        c = self.counter
        if key in self.seen:
            return self._replay(x, cache, *self.seen[key])
        before, peak, alive = c.live, c.peak, set(c.sizes)
        c.peak = c.live
        y = self.step(x, cache)
        delta, c.peak = c.peak - before, max(peak, c.peak)
        new = {} if cache is None else dict(cache.state)
        storages = [t.untyped_storage()._cdata for t in [y, *_leaves(list(new.values()))]]
        if len(set(storages)) == len(storages) and all(
                _nbytes(t) == t.untyped_storage().nbytes() for t in [y, *_leaves(list(new.values()))]):
            # what the first step of a shape makes once and keeps (e.g. a 3-D kernel's summed 2-D
            # taps for a one-frame step): alive before any replay, so not the replay's to add
            kept = sum(size for k, size in c.sizes.items() if k not in alive and k not in storages)
            self.seen[key] = (delta - kept, c.live - before - kept, self._template(y),
                              {k: self._template(v) for k, v in new.items()})
        return y

    @staticmethod
    def _template(v):
        if isinstance(v, torch.Tensor):
            return ("t", tuple(v.shape), v.stride(), v.dtype, v.device)
        return tuple(map(_Replay._template, v)) if isinstance(v, (tuple, list)) else ("v", v)

    @staticmethod
    def _make(t):
        if t[0] == "t":
            return torch.empty_strided(t[1], t[2], dtype=t[3], device=t[4])
        if t[0] == "v":
            return t[1]
        return tuple(map(_Replay._make, t))

    def _replay(self, x, cache, delta: int, net: int, out, state) -> torch.Tensor:
        c = self.counter
        before, peak = c.live, c.peak
        y = self._make(out)
        if cache is not None:
            fresh = {k: self._make(v) for k, v in state.items()}
            cache.state.clear()
            cache.state.update(fresh)
        if c.live - before != net:  # a step whose effect a replay cannot reproduce: a bug here
            raise AssertionError(f"replayed step changed live bytes by {c.live - before}, not {net}")
        c.peak = max(peak, before + delta)
        return y


@dataclass(frozen=True)
class Steps:
    """One direction's count: the peak, and what stays alive between steps (causal caches)."""

    peak: int
    held: int
    conv: int


def counted_levers(levers: Levers) -> Levers:
    """The levers that change what is allocated; how kernels run (fused, compiled, autotuned) is
    left out: the meta device runs none of it."""
    names = {f.name for f in dataclasses.fields(levers)}
    return replace(levers, **{k: False for k in ("fused_norm", "compile", "cudnn_benchmark") if k in names})


def meta_model(config: CausalVAEConfig, dtype: torch.dtype, levers: Levers) -> CausalVAE:
    """The model as shapes only, for counting: built once per layout, dtype and levers."""
    return _meta_model(config.to_json(), dtype, counted_levers(levers))


@functools.lru_cache(maxsize=8)
def _meta_model(config: str, dtype: torch.dtype, levers: Levers) -> CausalVAE:
    with torch.device("meta"):
        return CausalVAE(CausalVAEConfig.from_dict(json.loads(config))).eval().to(dtype).use_levers(levers)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(_nbytes(t) for t in [*model.parameters(), *model.buffers()])


def _time_groups(options: StreamOptions, factor: int, latent: bool, frames: int | None, image: bool) -> list[tuple[int, bool]]:
    """(length, final) of the steps to count: enough to reach a stream's steady state (its first
    three chunks; a decode then flushes), one window, or the whole clip."""
    if image:
        return [(1, True)]
    first, size, _ = plan(options, factor, latent)
    n = padded_length(frames or WINDOW_FRAMES, factor)
    if latent:
        n = (n - 1) // factor + 1
    if options.mode != "stream":
        return [(min(first, n), True)]
    if latent:
        return [(first, False), (size, False), (size, False), (0, True)]
    return [(first, False), (size, False), (size, True)]


@torch.inference_mode()
def count_steps(model: CausalVAE, direction: str, width: int, height: int, options: StreamOptions,
                image: bool = False, frames: int | None = None, batch: int = 1, explain: bool = False,
                replay: bool = True) -> tuple[Steps, LiveTensorBytes]:
    """Count one direction ("encode" or "decode") of a cut at a frame size, on the model's own
    device and dtype (the meta device: shapes only). `frames` matters for `whole` and short
    `window` clips (unknown: one window); `batch` clips go together."""
    p = next(model.parameters())
    ft, fs = model.config.time_compression, model.config.space_compression
    streaming = options.mode == "stream" and not image
    latent = direction == "decode"
    held = 0
    with _fast_meta_norms(), LiveTensorBytes(explain) as counter:
        if direction == "encode":
            step, tiler = encode_step(model), Tiler(options.tile, 1 / fs, streaming)
        else:
            step, tiler = decode_step(model), Tiler(options.tile and options.tile // fs, fs, streaming,
                                                    match=options.match_tiles)
        step = _Replay(counter, step) if replay else step
        for length, final in _time_groups(options, ft, latent, frames, image):
            if latent:
                x = torch.zeros(batch, model.config.embed_dim, length, padded_size(height, fs) // fs,
                                padded_size(width, fs) // fs, device=p.device, dtype=p.dtype)
            else:
                clips = [uint8_to_pixels(torch.zeros(length, height, width, 3, dtype=torch.uint8, device=p.device),
                                         p.device, p.dtype, fs) for _ in range(batch)]
                x = torch.cat(clips) if batch > 1 else clips[0]  # as `stream.lockstep` stacks them
                del clips
            y = tiler.run(step, x, final)
            del x
            if latent and y.shape[2]:
                pixels_to_uint8(y, height, width)
            del y
            held = max(held, cache_bytes(tiler))
    return Steps(counter.peak, held, counter.conv), counter


@functools.lru_cache(maxsize=1024)
def _counted(config: str, dtype: torch.dtype, levers: Levers, direction: str, width: int, height: int,
             options: StreamOptions, image: bool, frames: int | None, batch: int) -> Steps:
    return count_steps(_meta_model(config, dtype, levers), direction, width, height, options, image, frames, batch)[0]


@dataclass(frozen=True)
class Count:
    """A cut's counted bytes: the weights, each direction's peak and what it holds between steps,
    and the largest convolution's input + output (the backend's copies)."""

    weights: int
    encode: Steps | None
    decode: Steps | None

    def peak(self, direction: str, copies: bool = True) -> int:
        """Bytes alive at the peak, weights included, with the backend's `copies` of the largest
        convolution's input and output (the resident set on the CPU, the allocator's peak on a GPU;
        without them, the model's own tensors alone). Reconstruct runs encode and decode steps in
        turn in one thread: one direction's peak over the other's caches."""
        e, d = self.encode, self.decode
        if direction == "encode":
            peak, conv = e.peak, e.conv
        elif direction == "decode":
            peak, conv = d.peak, d.conv
        else:
            peak, conv = max(e.peak + d.held, d.peak + e.held), max(e.conv, d.conv)
        return self.weights + peak + (conv if copies else 0)


def count(config: CausalVAEConfig, dtype: torch.dtype, levers: Levers, direction: str, width: int, height: int,
          options: StreamOptions, image: bool = False, frames: int | None = None, batch: int = 1) -> Count:
    """The exact count of a cut (cached per layout, dtype, levers, size and cut). Only `whole` and
    `window` depend on the length, and a stream on nothing but the frame size."""
    if options.mode == "stream" or image:
        frames = None
    elif options.mode == "window" and frames is not None:
        frames = min(padded_length(frames), WINDOW_FRAMES)
    need = ("encode", "decode") if direction == "reconstruct" else (direction,)
    levers = counted_levers(levers)
    steps = {d: _counted(config.to_json(), dtype, levers, d, width, height, options, image, frames, batch) for d in need}
    return Count(weight_bytes(meta_model(config, dtype, levers)), steps.get("encode"), steps.get("decode"))


# --- the budget --------------------------------------------------------------------------------

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, option: str = "--memory-budget") -> int:
    """'12GiB', '800MiB', '1.5GB' -> bytes; anything else is refused in one line."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in UNITS:
        raise CvaeError(f"{option} {text}: expected a size with a unit, e.g. 12GiB or 800MiB")
    size = int(float(m.group(1)) * UNITS[unit])
    if size <= 0:
        raise CvaeError(f"{option} {text}: must be more than 0")
    return size


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


MARGIN = 0.1  # of the free memory, kept back by default: other processes, allocator slack
MARGIN_MIN = GIB // 2


def available_ram(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes of RAM the kernel says a new allocation can take (MemAvailable), or None."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class Budget:
    """The memory a run may use, weights included, and for which command (the direction whose
    peak counts); `copies`: whether the count adds the backend's copies of a convolution's input
    and output, as cuDNN and oneDNN make them (False: the model's own tensors alone, for tables of
    the count). `source` says where the size came from, for messages."""

    bytes: int
    direction: str = "reconstruct"
    copies: bool = True
    source: str = "--memory-budget"

    def __str__(self) -> str:
        return gib(self.bytes) + ("" if self.source == "--memory-budget" else f" ({self.source})")


def default_budget(device: torch.device, model: torch.nn.Module, direction: str) -> Budget | None:
    """What is free now, the loaded weights added back (the count includes them), less a margin:
    on a GPU its free memory, on the CPU MemAvailable. None where neither can be read."""
    weights = weight_bytes(model)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"free memory of {device}"
    elif device.type == "cpu":
        free, where = available_ram(), "available RAM"
        if free is None:
            return None
    else:
        return None
    size = int(free - max(MARGIN * free, MARGIN_MIN)) + weights
    return Budget(max(size, 1), direction, source=f"{where} less {MARGIN:.0%}")


# --- the cut that fits -------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """A cut and its counted peak against the budget; `fits` False means even the smallest cut
    tried does not fit (it is the one with the least peak)."""

    options: StreamOptions
    peak: int
    budget: Budget
    fits: bool

    def describe(self) -> str:
        return f"{describe_cut(self.options)}, counted {gib(self.peak)} of {gib(self.budget.bytes)}"


def describe_cut(options: StreamOptions) -> str:
    tile = f"{options.tile}-pixel tiles" if options.tile else "whole frames"
    time = f"chunk {options.chunk}" if options.mode == "stream" else options.mode
    return f"{time}, {tile}"


def candidates(mode: str, width: int, height: int, chunk: int | None, tile: int | str | None,
               image: bool) -> list[StreamOptions]:
    """The cuts to try, in order of preference: no tiles, then the largest tiles, then the longest
    chunk. What the user fixed stays fixed; chunks matter to a stream of a video only."""
    side = max(padded_size(width), padded_size(height))
    tiles = [None] + [t for t in TILES if t < side] if tile == "auto" else [tile]
    chunks = [chunk] if chunk is not None else list(CHUNKS) if mode == "stream" and not image else [CHUNKS[0]]
    return [StreamOptions(mode=mode, chunk=c, tile=t) for t in tiles for c in chunks]


def fit(config: CausalVAEConfig, dtype: torch.dtype, levers: Levers, budget: Budget, mode: str, width: int,
        height: int, chunk: int | None = None, tile: int | str | None = "auto", image: bool = False,
        frames: int | None = None, batch: int = 1, smaller: int = 0) -> Choice:
    """The first cut in order of preference whose count fits the budget (with `smaller` > 0, that
    many steps down to cuts of lower count after it: the retry after running out of memory), else
    the cut of least count, marked as not fitting. A tile size with no chunk that fits is passed
    over after one count at its shortest chunk; in a stream, where each tile keeps its own caches,
    the walk stops at the first tile size that needs more than the one before."""
    options = candidates(mode, width, height, chunk, tile, image)
    peak = lambda o: count(config, dtype, levers, budget.direction, width, height, o, image, frames,  # noqa: E731
                           batch).peak(budget.direction, budget.copies)
    least = None
    chosen = None
    shortest = options[-1].chunk
    caches = mode == "stream" and not image
    floor = None  # the previous tile size's count at the shortest chunk
    for i, o in enumerate(options):
        at_shortest = peak(replace(o, chunk=shortest))
        if caches and o.chunk == options[0].chunk:
            if floor is not None and at_shortest > floor:
                break  # every tile keeps its caches, over the overlap: smaller tiles only need more
            floor = at_shortest
        if o.chunk != shortest and at_shortest > budget.bytes:
            continue  # this tile does not fit even at the shortest chunk
        n = peak(o)
        if least is None or n < least[1]:
            least = (i, n)
        if n <= budget.bytes:
            chosen = (i, n)
            break
    if chosen is None:
        i, n = least
        return Choice(options[i], n, budget, False)
    i, n = chosen
    for _ in range(smaller):
        lower = next(((j, peak(options[j])) for j in range(i + 1, len(options)) if peak(options[j]) < n), None)
        if lower is None:
            break
        i, n = lower
    return Choice(options[i], n, budget, True)


def explicit(config: CausalVAEConfig, dtype: torch.dtype, levers: Levers, budget: Budget, options: StreamOptions,
             width: int, height: int, image: bool = False, frames: int | None = None, batch: int = 1) -> Choice:
    """A cut the user gave, counted against the budget (they get a warning when it does not fit)."""
    n = count(config, dtype, levers, budget.direction, width, height, options, image, frames, batch) \
        .peak(budget.direction, budget.copies)
    return Choice(options, n, budget, n <= budget.bytes)


# --- running out of memory ---------------------------------------------------------------------

def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError ("DefaultCPUAllocator: can't
    allocate memory: you tried to allocate N bytes") and other backends' "out of memory"."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, (RuntimeError, MemoryError)) and (
        isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text
        or "cannot allocate memory" in text)


def release_memory() -> None:
    """Give back what a failed GPU step held, before anything else runs."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory(error: BaseException, where: str, device: torch.device | str | None,
                  choice: Choice | None = None) -> CvaeError:
    """The one line for an input that ran out of memory: what ran out, for which input, what to do."""
    kind = "GPU memory" if str(device).startswith("cuda") else "RAM"
    at = f" at {choice.describe()}" if choice is not None else ""
    return CvaeError(f"{where}: out of {kind} on {device}{at}; try a smaller --tile or --chunk, a smaller "
                     f"--memory-budget, or another device (--device)")


T = TypeVar("T")


def within_memory(run: Callable[[object], T], options, where: str, device, note: Callable[[str], None]) -> T:
    """`run(options)`; when it runs out of memory and `options` is a `Policy` with a smaller cut,
    once more with that cut, said in one line; running out of memory after that is
    `out_of_memory`'s one line. Other failures propagate."""
    try:
        return run(options)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        release_memory()
        last = options.last if isinstance(options, Policy) else None
        smaller = options.shrunk() if isinstance(options, Policy) else None
        if smaller is None:
            raise out_of_memory(error, where, device, last) from None
    note(f"{where}: out of memory at {last.describe()}; retrying once with "
         f"{describe_cut(smaller.last.options)} (counted {gib(smaller.last.peak)})")
    try:
        return run(smaller)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        release_memory()
        raise out_of_memory(error, where, device, smaller.last) from None


# --- the cut for each input --------------------------------------------------------------------

@dataclass
class Policy:
    """How each input is cut: what the user fixed (`chunk`, `tile`, `mode`) stays, the rest is the
    cut that fits the budget (`fit`). Called as `policy(width, height, image, frames=, batch=)` for
    each input; `last` is the choice it made last. An input that cannot fit even at the smallest
    cut fails before it runs (CvaeError); a cut the user fixed that does not fit runs, after a
    one-line warning (`warn`)."""

    config: CausalVAEConfig
    dtype: torch.dtype
    levers: Levers
    budget: Budget
    mode: str = "auto"
    chunk: int | None = None
    tile: int | str | None = "auto"
    smaller: int = 0
    warn: Callable[[str], None] = field(default=lambda message: None, compare=False, repr=False)
    last: Choice | None = field(default=None, compare=False)
    _args: tuple | None = field(default=None, compare=False, repr=False)
    _warned: set = field(default_factory=set, compare=False, repr=False)

    def choice(self, width: int, height: int, image: bool = False, frames: int | None = None,
               batch: int = 1) -> Choice:
        from .stream import exact_streaming

        mode = self.mode if self.mode != "auto" else "stream" if exact_streaming(self.config) else "window"
        try:
            if self.chunk is not None and self.tile != "auto":
                options = StreamOptions(mode=mode, chunk=self.chunk, tile=self.tile)
                choice = explicit(self.config, self.dtype, self.levers, self.budget, options, width, height,
                                  image, frames, batch)
            else:
                choice = fit(self.config, self.dtype, self.levers, self.budget, mode, width, height, self.chunk,
                             self.tile, image, frames, batch, self.smaller)
        except ValueError as e:
            raise CvaeError(str(e)) from None
        self.last, self._args = choice, (width, height, image, frames, batch)
        if not choice.fits:
            fixed = self.chunk is not None or self.tile != "auto"
            message = (f"{width}x{height}{' (image)' if image else ''} needs {gib(choice.peak)} at "
                       f"{'the cut given' if fixed else 'the smallest cut'} ({describe_cut(choice.options)}), "
                       f"over the memory budget of {self.budget}")
            if not fixed:
                raise CvaeError(f"{message}: it would run out of memory; give a larger --memory-budget if the "
                                "memory is there, or use another device")
            if message not in self._warned:
                self._warned.add(message)
                self.warn(message)
        return choice

    def __call__(self, width: int, height: int, image: bool = False, frames: int | None = None,
                 batch: int = 1) -> StreamOptions:
        return self.choice(width, height, image, frames, batch).options

    def shrunk(self) -> "Policy | None":
        """The same policy one cut smaller than its last choice (None if there is none), its
        `last` set to that cut."""
        if self.last is None or self._args is None:
            return None
        smaller = replace(self, smaller=self.smaller + 1, _warned=set())
        try:
            choice = smaller.choice(*self._args)
        except CvaeError:
            return None
        return smaller if choice.options != self.last.options and choice.peak < self.last.peak else None
