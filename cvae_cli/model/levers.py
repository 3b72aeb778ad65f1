"""Speed levers: switches around the model, in force while `CausalVAE.encode`/`decode` run.

One `Levers` value says which are on; the model holds it (`CausalVAE.use_levers`) and makes it the
active one for the length of each call (`running`). Layers that have a faster way to compute the
same function ask `active()` which way to take; no layer is rewritten or replaced. Each lever gives
the plain path's function to float rounding (tests/test_levers.py, tests/test_accel.py).

    model.use_levers(Levers(fused_norm=True, compile=True))    # Levers.off(): the plain path

Kinds of lever:
- exact shortcuts in the arithmetic, on by default: `fold_start`, `phase_upsample` (layers.py);
- memory: `slice_elements`, which runs the frame-local leading (encoder) or trailing (decoder)
  stages a few frames at a time (`in_slices`, around the encoder's and decoder's plain forward);
- kernels: `fused_norm` (GroupNorm + SiLU as one compiled kernel), `compile` (torch.compile per
  block: blocks of one shape share a graph), `cudnn_benchmark` (cuDNN times its algorithms).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class Levers:
    """Which speed-ups are on.

    fold_start: a causal conv's first frames see frame 0 through the taps that reach before the clip;
      those taps' kernels are summed instead of frame 0 being repeated (`layers.CausalConv3d.start`):
      an image costs a third of the 3-D conv FLOPs. Also the temporal downsamplers' first window.
    phase_upsample: nearest 2x + 3x3 conv as one stride-2 transposed conv (`layers.phase_kernel`):
      2.25x fewer multiply-adds in those convs, and no 4x upsampled tensor.
    slice_elements: a step's frames go through the model a few at a time (down to one), so that at
      each stage at most this many activation elements (channels x pixels x frames) come in at once;
      the causal layers carry what the next slice needs. Only stages whose every norm and attention
      is per frame (a clip norm pools over whatever it is given, so slicing would change it) and
      never under autograd (a cache mutated inside `torch.utils.checkpoint` would be replayed
      wrong, and slices save no memory when every activation is kept for backward). None: off.
      Default: one 720p frame of the 128-channel level.
    fused_norm: GroupNorm + SiLU as one compiled kernel (statistics, then a single normalize-and-
      activate pass) instead of the norm, then a separate SiLU pass.
    compile: torch.compile each block (resnet, attention, resampler, conv_in/out) on its own: small
      graphs, and blocks of one shape share one, streaming or not: a block's layers get their part
      of the `StreamCache` by their names in the block, not their identity (`CompiledBlock`). A
      stream's first step and its last run eagerly: only the steady steps in between are compiled,
      so nothing recompiles after a video's second chunk.
    cudnn_benchmark: cuDNN times its algorithms for each new shape (CUDA only; a chunk's shape
      repeats for the whole video, so the search is paid once).
    """

    fold_start: bool = True
    phase_upsample: bool = True
    slice_elements: int | None = 128 * 1280 * 720
    fused_norm: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False

    @classmethod
    def off(cls) -> "Levers":
        return cls(fold_start=False, phase_upsample=False, slice_elements=None)


_active = Levers()


def active() -> Levers:
    """The levers of the model running now (the defaults outside a `CausalVAE` call)."""
    return _active


@contextlib.contextmanager
def running(levers: Levers, cache) -> Iterator[None]:
    """Make `levers` the active ones for one encode or decode step (`cache`: the step's
    `StreamCache`, None for a whole clip). Not for threads that run models at once."""
    global _active
    before, benchmark = _active, torch.backends.cudnn.benchmark
    _active = levers
    torch.backends.cudnn.benchmark = benchmark or levers.cudnn_benchmark
    steady = cache is not None and not cache.final and bool(cache.state)
    try:
        with eager() if levers.compile and not steady else contextlib.nullcontext():
            yield
    finally:
        _active, torch.backends.cudnn.benchmark = before, benchmark


def eager() -> contextlib.AbstractContextManager:
    """Compiled blocks run their plain code: a stream's first and last steps, and images, whose
    shapes and cache states a video sees once (torch < 2.6 has no stances: there they compile)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


BACKEND = "inductor"  # torch.compile's backend for the compile lever (tests trace with "aot_eager": no codegen)


class BlockCache:
    """One compiled block's share of a stream's `StreamCache`, for the length of one call: the same
    get/put/take, keyed by each layer's name inside its block (`"conv1"`, `"conv2"`; "" for a block
    that is itself a layer) instead of by its identity. A graph then sees the same keys, in the same
    order, for every block of one shape, and no layer's identity: dynamo has nothing that tells two
    such blocks apart, so they share one graph (a `StreamCache` reads `id(layer)`, and dynamo guards
    on the identity of every layer whose id it reads)."""

    def __init__(self, final: bool, state: dict[str, object]):
        self.final, self.state = final, state

    def get(self, layer: nn.Module, default=None):
        return self.state.get(layer.stream_slot, default)

    def put(self, layer: nn.Module, value) -> None:
        self.state[layer.stream_slot] = value

    def take(self, layer: nn.Module):
        return self.state.pop(layer.stream_slot, None)


class CompiledBlock:
    """A block's call under the compile lever (`nn.Module._compiled_call_impl`): the block's own
    forward, compiled, given a `BlockCache` that carries its layers' part of the stream's cache in
    and out. The block's code is not changed: each of its modules is given its name in the block
    (`stream_slot`), which only a `BlockCache` reads."""

    def __init__(self, block: nn.Module):
        self.compiled = torch.compile(block._call_impl, backend=BACKEND, dynamic=False)
        self.layers = list(block.named_modules())
        for name, layer in self.layers:
            layer.stream_slot = name

    def __call__(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        if cache is None:
            return self.compiled(x)
        own = {}
        for name, layer in self.layers:
            value = cache.take(layer)
            if value is not None:
                own[name] = value
        part = BlockCache(cache.final, own)
        y = self.compiled(x, part)
        for name, layer in self.layers:
            if name in part.state:
                cache.put(layer, part.state[name])
        return y


def compile_blocks(model: nn.Module, on: bool) -> None:
    """torch.compile every block of `model.blocks()` on its own (or undo it). With nn modules
    inlined, a block's weights are graph inputs, not constants of its graph, and blocks of one shape
    share a graph, streaming or not (`CompiledBlock`)."""
    config = torch._dynamo.config
    if on:
        # a graph per block shape (and chunk length), kept per class's forward: the released
        # decoder's resnets come in several shapes; the default limit is 8 per code object
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(128, getattr(config, name)))
        if hasattr(config, "accumulated_cache_size_limit"):
            config.accumulated_cache_size_limit = max(512, config.accumulated_cache_size_limit)
        if torch.torch_version.TorchVersion(torch.__version__) < (2, 5):  # before, weights were constants:
            config.inline_inbuilt_nn_modules = True  # one graph per block, not per shape
    for block in model.blocks():
        block._compiled_call_impl = CompiledBlock(block) if on else None
