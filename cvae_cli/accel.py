"""Speed levers for inference, each off by default and each proven on the CPU to compute the same
function as the plain model (tests/test_accel.py). Measured outcomes: benchmarks/README.md.

These change how kernels run (memory layout, fusion, compilation), not the arithmetic. The levers
that do less arithmetic or hold less memory are the model's own, on by default (`model.Levers`).

    model = accel.prepare(model, Acceleration(channels_last=True, fused_norm=True, compile=True))

`prepare` changes the model in place (memory format, compiled parts) and records the levers on
`model.acceleration`, where `stream` reads how to lay out its inputs. Batching several clips' chunks
together is `stream.encode_batch` / `stream.decode_batch`, not a model change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .model import CausalVAE
from .model.layers import GroupNorm, group_norm_silu


@dataclass(frozen=True)
class Acceleration:
    """Which levers are on.

    channels_last: Conv weights and activations in channels-last-3d (NDHWC), the layout cuDNN's
      fastest bf16 3-D convolution kernels want; NCDHW makes it transpose around every conv.
    fused_norm: GroupNorm + SiLU as one compiled kernel (statistics, then a single normalize-and-
      activate pass) instead of norm, then a separate SiLU pass over the activation.
    compile: torch.compile of the encoder and decoder step with a dynamic time length, so the first
      chunk (1 + c frames), later chunks (c) and a short last chunk share graphs. StreamCache is a
      plain dict that dynamo traces through; it specialises on "cache empty or not" (two graphs
      per direction), not on the chunk length.
    cudnn_benchmark: let cuDNN time its algorithms for each new shape (CUDA only; a chunk shape
      repeats for the whole video, so the search is paid once).
    backend: torch.compile backend ("inductor"; "aot_eager" traces without generating code).
    """

    channels_last: bool = False
    fused_norm: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    backend: str = "inductor"

    @classmethod
    def all(cls) -> "Acceleration":
        return cls(channels_last=True, fused_norm=True, compile=True, cudnn_benchmark=True)


_FUSED: dict[str, object] = {}


def fused_group_norm_silu(backend: str = "inductor"):
    """`group_norm_silu` compiled once per backend, dynamic in every size (one graph for all layers)."""
    if backend not in _FUSED:
        # One graph per (channels, norm kind, activation): ~12 in the released model, over the default limit of 8.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        _FUSED[backend] = torch.compile(group_norm_silu, dynamic=True, backend=backend)
    return _FUSED[backend]


def to_channels_last(module: nn.Module) -> nn.Module:
    """Conv weights to channels-last (3-d for Conv3d); `Module.to(memory_format=)` refuses mixed 4-D/5-D."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.Conv2d)):
            fmt = torch.channels_last_3d if m.weight.ndim == 5 else torch.channels_last
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)
    return module


def layout(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The memory format the model's levers want its 5-D input in."""
    acc = getattr(model, "acceleration", None)
    if acc is not None and acc.channels_last and x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def prepare(model: CausalVAE, options: Acceleration) -> CausalVAE:
    """Turn the levers on for `model` (in place; returns it). Call once, after moving it to its device."""
    if options.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if options.channels_last:
        to_channels_last(model)
    if options.fused_norm:
        fused = fused_group_norm_silu(options.backend)
        for m in model.modules():
            if isinstance(m, GroupNorm):
                m.fused = fused
    if options.compile:
        for part in (model.encoder, model.decoder):
            part.compile(dynamic=True, backend=options.backend)
    model.acceleration = options
    return model
