"""The `slice_elements` lever: a step's frame-local stages run a few frames at a time, around the
encoder's and decoder's plain forward (`in_slices`), so that only one slice's activations are alive."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import blocks, layers
from .layers import StreamCache


def frame_local(module: nn.Module) -> bool:
    """Whether each output frame depends on input frames only through causal, cached layers: every
    norm per frame, no attention across time (the legacy AttnBlock3D mixes the whole chunk)."""
    return all(m.per_frame for m in module.modules() if isinstance(m, layers.GroupNorm)) \
        and not any(type(m) is blocks.AttnBlock3D for m in module.modules())


def widest(stage: nn.Module) -> int:
    """Channels of the widest activation a stage makes, per pixel of its input (x4 where it upsamples)."""
    modules = list(stage.modules())
    width = max([max(m.in_channels, m.out_channels) for m in modules if isinstance(m, (nn.Conv2d, nn.Conv3d))]
                + [m.num_channels for m in modules if isinstance(m, layers.GroupNorm)])
    return width * (4 if any(isinstance(m, (layers.SpatialUpsample2x, layers.Upsample)) for m in modules) else 1)


def run(stage: nn.Module, h: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
    """One step of a forward: a norm stage is the norm then SiLU (the output's), any other takes the cache."""
    return stage(h, silu=True) if isinstance(stage, layers.GroupNorm) else stage(h, cache)


def sliced(part: nn.Module, leading: bool) -> list[bool]:
    """Which of `part.stages()` run in slices: the frame-local ones at the start (`leading`, the
    encoder) or at the end (the decoder), if more than one (conv_in or conv_out alone in slices
    would gather its full-size input or output anyway)."""
    local = [frame_local(s) for s in part.stages()]
    if not leading:
        return sliced_run(local[::-1])[::-1]
    return sliced_run(local)


def sliced_run(local: list[bool]) -> list[bool]:
    n = local.index(False) if False in local else len(local)
    return [i < n and n > 1 for i in range(len(local))]


def in_slices(part: nn.Module, x: torch.Tensor, cache: StreamCache | None, elements: int | None,
              leading: bool) -> torch.Tensor:
    """`part(x, cache)` (the encoder or the decoder, whose `stages()` are the steps of its forward),
    with its `sliced` stages in slices of `elements` (`Levers.slice_elements`); where none are,
    the plain forward runs."""
    which = sliced(part, leading) if elements and not torch.is_grad_enabled() else []
    if not any(which):
        return part(x, cache)
    stages = part.stages()
    before = [s for s, cut in zip(stages, which) if not cut and leading is False]
    inside = [(s, widest(s)) for s, cut in zip(stages, which) if cut]
    after = [s for s, cut in zip(stages, which) if not cut and leading is True]
    h = x
    for stage in before:
        h = run(stage, h, cache)
    h = run_in_slices(inside, h, cache, elements)
    for stage in after:
        h = run(stage, h, cache)
    return h


Stage = tuple[nn.Module, int]  # (a step of a forward, widest(step))


def run_in_slices(stages: Sequence[Stage], h: torch.Tensor, cache: StreamCache | None, elements: int,
                  final: bool | None = None) -> torch.Tensor:
    """`stages` one after the other, each fed a few frames at a time: as many as keep its widest
    activation under `elements` (at least one). Depth first: a slice goes on through the next
    stages before the next slice comes in, so only one slice's activations are alive at a time.
    The causal layers pass what the next slice needs through `cache` (a fresh one for a whole
    clip); only the last slice of a final step is final."""
    if not stages:
        return h
    if final is None:
        final, cache = (True, StreamCache()) if cache is None else (cache.final, cache)
    (stage, width), rest = stages[0], stages[1:]
    size = max(1, elements // (width * h.shape[0] * h.shape[-2] * h.shape[-1]))
    starts = range(0, h.shape[2], size) if h.shape[2] else [0]
    outs = []
    for i, s in enumerate(starts):
        last = final and i == len(starts) - 1
        cache.final = last
        outs.append(run_in_slices(rest, run(stage, h[:, :, s:s + size], cache), cache, elements, last))
    cache.final = final
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
