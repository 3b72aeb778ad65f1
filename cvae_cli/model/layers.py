"""Convolutions, norms and resampling in time and space, each able to run on a stream of chunks.

Every layer that looks at past frames takes an optional `StreamCache`. Without one it sees a whole
clip, exactly as Open-Sora-Plan computes it. With one, it keeps what the next chunk needs (the last
input frames, the phase of a stride, a frame held back for look-ahead), so a clip fed in chunks gives
the whole-clip result wherever the model itself is causal.

Two exact shortcuts live here, each taken when the active levers say so (`levers.active()`):
- `fold_start`: at a clip's start the causal padding repeats frame 0, so the taps that reach before
  the clip all see frame 0. Their kernels are summed instead of the frame being repeated: an image
  runs every 3-D conv as one 2-D conv (a third of the FLOPs), and no padded copy is made.
- `phase_upsample` (SpatialUpsample2x, Upsample): nearest 2x then a 3x3 conv is one stride-2 transposed conv
  with a 4x4 kernel on the small input: 2.25x fewer multiply-adds and no upsampled tensor.
Both are plain functions of the weights, so they hold under autograd too.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .levers import active


class StreamCache:
    """What each layer carries from one chunk to the next; `final` marks the stream's last chunk,
    after which nothing is kept (an image, or any last chunk, has no next chunk to feed)."""

    def __init__(self) -> None:
        self.state: dict[int, object] = {}
        self.final = False

    def select(self, index: list[int]) -> "StreamCache":
        """The caches of some batch rows only: when clips streamed together part ways (`encode_batch`)."""
        out = StreamCache()
        out.final = self.final
        pick = lambda v: v[index] if isinstance(v, torch.Tensor) else tuple(map(pick, v)) if isinstance(v, tuple) else v
        out.state = {k: pick(v) for k, v in self.state.items()}
        return out

    def get(self, layer: nn.Module, default=None):
        return self.state.get(id(layer), default)

    def put(self, layer: nn.Module, value) -> None:
        self.state[id(layer)] = value

    def take(self, layer: nn.Module):
        """What the layer left, no longer held here (so that it can be freed as soon as it is used)."""
        return self.state.pop(id(layer), None)


def keep(cache: StreamCache | None, layer: nn.Module, make: Callable[[], object]) -> None:
    """Leave `make()` for the layer's next chunk; on the last chunk drop what it held instead."""
    if cache is not None and cache.final:
        cache.take(layer)
    elif cache is not None:
        cache.put(layer, make())


def starts(layer: nn.Module, cache: StreamCache | None) -> bool:
    """Whether `layer` sees a clip's first frames now: no cache, or nothing in it for the layer yet."""
    return cache is None or cache.get(layer) is None


def causal_window(layer: nn.Module, x: torch.Tensor, kernel: int, stride: int, cache: StreamCache | None):
    """Prepend the past frames a temporal kernel needs: frame 0 repeated at the clip's start
    (Open-Sora-Plan's causal padding), the previous chunk's unconsumed frames afterwards."""
    if kernel == 1 and stride == 1 or x.shape[2] == 0:
        return x
    past = cache.take(layer) if cache is not None else None
    if past is None:
        past = x[:, :, :1].expand(-1, -1, kernel - 1, -1, -1)
    x = torch.cat([past, x], dim=2)
    del past  # freed now, not after the next chunk's cache is made: one copy fewer alive at once
    windows = max(0, (x.shape[2] - kernel) // stride + 1)
    keep(cache, layer, lambda: x[:, :, windows * stride:].clone())
    return x


def keep_after_start(layer: nn.Module, x: torch.Tensor, kernel: int, stride: int, cache: StreamCache | None) -> None:
    """Keep what `causal_window` would after a clip's first chunk `x`, without building the window."""
    first = ((x.shape[2] - 1) // stride + 1) * stride - (kernel - 1)  # index in x; < 0 is in the padding
    keep(cache, layer, lambda: x[:, :, first:].clone() if first >= 0 else
         torch.cat([x[:, :, :1].expand(-1, -1, -first, -1, -1), x], dim=2))


def fold_taps(weight: torch.Tensor, n: int) -> torch.Tensor:
    """A time kernel whose first `n` taps all see one frame, as one tap holding their sum (summed in
    float32, so that bf16 weights round once)."""
    head = weight[:, :, :n].float().sum(2, keepdim=True).to(weight.dtype)
    return torch.cat([head, weight[:, :, n:]], dim=2) if n < weight.shape[2] else head


def frames_first(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W): treat every frame as an image."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def frames_back(y: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of `frames_first`, given the batch size (the frame count may be 0)."""
    bt, c, h, w = y.shape
    return y.reshape(b, bt // b, c, h, w).transpose(1, 2)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when nothing records the graph (x is then the caller's own, one tensor less)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                    per_frame: bool, silu: bool) -> torch.Tensor:
    """GroupNorm (clip or frame statistics), then SiLU if asked: the plain path, and the function that
    the `fused_norm` lever compiles into one kernel (statistics + one normalize-and-activate pass)."""
    if x.ndim == 5 and per_frame:
        y = frames_back(F.group_norm(frames_first(x), groups, weight, bias, eps), x.shape[0])
    else:
        y = F.group_norm(x, groups, weight, bias, eps)
    # In place when nothing records the graph: the norm's output is ours, one activation less in memory.
    return F.silu(y, inplace=not torch.is_grad_enabled()) if silu else y


_FUSED: list[Callable] = []


def fused_group_norm_silu() -> Callable:
    """`group_norm_silu` compiled once, dynamic in every size (one graph for all layers)."""
    if not _FUSED:
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # one graph per (channels, norm kind, SiLU)
            if hasattr(config, name):
                setattr(config, name, max(64, getattr(config, name)))
        _FUSED.append(torch.compile(group_norm_silu, dynamic=True))
    return _FUSED[0]


class GroupNorm(nn.GroupNorm):
    """32-group norm pooled over the whole clip ("clip", as trained) or per frame ("frame", as SD).

    `forward(x, silu=True)` applies SiLU too, in one pass over memory with the `fused_norm` lever."""

    def __init__(self, channels: int, per_frame: bool):
        super().__init__(32, channels, eps=1e-6, affine=True)
        self.per_frame = per_frame

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        fn = fused_group_norm_silu() if active().fused_norm else group_norm_silu
        return fn(x, self.weight, self.bias, self.num_groups, self.eps, self.per_frame, silu)


class StreamConv3d(nn.Conv3d):
    """`nn.Conv3d` that answers "no frames yet" when given fewer frames than its time kernel: the
    step that flushes a decoding stream carries no new latent, only what layers held back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] >= self.kernel_size[0]:
            return super().forward(x)
        h, w = ((n + 2 * p - k) // s + 1 for n, p, k, s in
                zip(x.shape[3:], self.padding[1:], self.kernel_size[1:], self.stride[1:]))
        return x.new_empty(x.shape[0], self.out_channels, 0, h, w)


class CausalConv3d(nn.Module):
    """3-D convolution that sees only the present and past frames; the first frame pads time."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        kernel_size = _triple(kernel_size)
        self.time_kernel = kernel_size[0]
        self.time_stride = _triple(stride)[0]
        padding = (0,) + _triple(padding)[1:]
        self.conv = StreamConv3d(cin, cout, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if active().fold_start and self.time_kernel > 1 and self.time_stride == 1 and x.shape[2] and starts(self, cache):
            return self.start(x, cache)
        return self.conv(causal_window(self, x, self.time_kernel, self.time_stride, cache))

    def start(self, x: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
        """A clip's first frames without the padding: output frame t < k-1 sees frame 0 through its
        first k-t taps, so it is a conv of frames 0..t with those taps summed (t = 0: a 2-D conv);
        later frames are a plain conv of x."""
        k, t = self.time_kernel, x.shape[2]
        keep_after_start(self, x, k, 1, cache)
        conv = self.conv
        out = [F.conv3d(x[:, :, :i + 1], fold_taps(conv.weight, k - i), conv.bias, conv.stride, conv.padding)
               for i in range(min(k - 1, t))]
        if t >= k:
            out.append(conv(x))
        return torch.cat(out, dim=2) if len(out) > 1 else out[0]


class FrameConv2d(nn.Conv2d):
    """A 2-D convolution applied to every frame (Open-Sora-Plan's `Conv2d`)."""

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return frames_back(super().forward(frames_first(x)), x.shape[0])


class SpatialDownsample2x(nn.Module):
    """Zero-pad right and bottom, then a (1, 3, 3) stride-(1, 2, 2) causal conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, (1, 3, 3), stride=(1, 2, 2))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Downsample(nn.Module):
    """SD's 2-D downsampling per frame: zero-pad right and bottom, 3x3 stride-2 conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return frames_back(self.conv(F.pad(frames_first(x), (0, 1, 0, 1))), x.shape[0])


# Rows of a 3x3 kernel (taps at -1, 0, +1) that each of the 4 taps of the stride-2 transposed conv
# sums: output row 2i reads input rows i-1 (tap -1) and i (taps 0, +1); row 2i+1 reads i (taps -1, 0)
# and i+1 (tap +1). conv_transpose2d with padding 1 places them at kernel rows 3, 1 and 2, 0.
PHASE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def phase_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) conv after nearest 2x -> (in, out, 4, 4) kernel of the equal transposed conv."""
    m = torch.tensor(PHASE_TAPS, dtype=torch.float32, device=weight.device)
    return torch.einsum("ar,bc,oirc->ioab", m, m, weight.float()).to(weight.dtype)


def upsample_by_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Nearest 2x then a 3x3 conv (padding 1) of every frame of (B, C, T, H, W), computed on the
    small frames: each output pixel's phase sees 2x2 input pixels (the `phase_upsample` lever)."""
    y = F.conv_transpose2d(frames_first(x), phase_kernel(weight), bias, stride=2, padding=1)
    return frames_back(y, x.shape[0])


class SpatialUpsample2x(nn.Module):
    """Nearest 2x per frame, then a (1, 3, 3) causal conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, (1, 3, 3), padding=1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if active().phase_upsample:
            return upsample_by_phases(x, self.conv.conv.weight[:, :, 0], self.conv.conv.bias)
        if x.shape[2] == 0:  # interpolate refuses empty inputs
            return self.conv(x.new_empty(*x.shape[:3], 2 * x.shape[3], 2 * x.shape[4]))
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


class Upsample(nn.Module):
    """SD's 2-D upsampling per frame: nearest 2x, then a 3x3 conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if active().phase_upsample:
            return upsample_by_phases(x, self.conv.weight, self.conv.bias)
        b, x = x.shape[0], frames_first(x)
        if x.shape[0] == 0:  # interpolate refuses empty inputs
            return frames_back(x.new_empty(0, self.conv.out_channels, 2 * x.shape[2], 2 * x.shape[3]), b)
        return frames_back(self.conv(F.interpolate(x, scale_factor=2, mode="nearest")), b)


def time_average(x: torch.Tensor) -> torch.Tensor:
    """Mean of 3 frames at stride 2 (an avg_pool3d, which the CPU lacks in bf16/fp16: upcast there)."""
    if x.shape[2] < 3:
        return x[:, :, :0]
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return F.avg_pool3d(x.float(), (3, 1, 1), stride=(2, 1, 1)).to(x.dtype)
    return F.avg_pool3d(x, (3, 1, 1), stride=(2, 1, 1))


class TimeDownsample2x(nn.Module):
    """Average of 3 frames, stride 2, frame 0 repeated in front: T -> (T + 1) / 2. No weights."""

    def __init__(self, cin: int = 0, cout: int = 0):
        super().__init__()

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if active().fold_start and x.shape[2] and starts(self, cache):  # the first window is frame 0 three times
            keep_after_start(self, x, 3, 2, cache)
            return torch.cat([x[:, :, :1], time_average(x)], dim=2)
        return time_average(causal_window(self, x, 3, 2, cache))


class TimeDownsampleRes2x(nn.Module):
    """v1.1.0's learned temporal downsampling: a mix of the 3-frame average and a stride-2 conv."""

    def __init__(self, cin: int, cout: int, mix_factor: float = 2.0):
        super().__init__()
        self.conv = StreamConv3d(cin, cout, 3, stride=(2, 1, 1), padding=(0, 1, 1))
        self.mix_factor = nn.Parameter(torch.tensor([mix_factor]))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        alpha = torch.sigmoid(self.mix_factor)
        if active().fold_start and x.shape[2] and starts(self, cache):  # the first window is frame 0 three times
            keep_after_start(self, x, 3, 2, cache)
            first = F.conv3d(x[:, :, :1], fold_taps(self.conv.weight, 3), self.conv.bias, padding=(0, 1, 1))
            first = alpha * x[:, :, :1] + (1 - alpha) * first
            return torch.cat([first, alpha * time_average(x) + (1 - alpha) * self.conv(x)], dim=2)
        x = causal_window(self, x, 3, 2, cache)
        return alpha * time_average(x) + (1 - alpha) * self.conv(x)


def doubled_in_time(head: torch.Tensor, x: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """`head`, then x at twice the frame rate by linear interpolation, as trilinear `interpolate` by 2
    (align_corners=False) computes it: frame i gives 0.25 x[i-1] + 0.75 x[i], then 0.75 x[i] +
    0.25 x[i+1], with x[-1] = `before` and x[n] = `after`. Written into the output in place: no
    window around x and no interpolated copy of it."""
    b, c, n, h, w = x.shape
    k = head.shape[2]
    out = x.new_empty(b, c, k + 2 * n, h, w)
    out[:, :, :k] = head
    pairs = out[:, :, k:].unflatten(2, (n, 2))
    early, late = pairs[:, :, :, 0], pairs[:, :, :, 1]
    early.copy_(x).mul_(0.75)
    early[:, :, :1].add_(before, alpha=0.25)
    early[:, :, 1:].add_(x[:, :, :-1], alpha=0.25)
    late.copy_(x).mul_(0.75)
    late[:, :, :-1].add_(x[:, :, 1:], alpha=0.25)
    late[:, :, -1:].add_(after, alpha=0.25)
    return out


class TimeUpsample2x(nn.Module):
    """Keep frame 0; double frames 1.. by linear interpolation in time: T -> 2T - 1. No weights.

    Each new pair depends on the frame before and after its source frame, so when streaming the
    last frame of a chunk is held back until the next chunk (or `cache.final`) supplies the one after.
    """

    def __init__(self, cin: int = 0, cout: int = 0):
        super().__init__()

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if cache is None:
            if x.shape[2] == 1:
                return x
            return doubled_in_time(x[:, :, :1], x[:, :, 1:], x[:, :, 1:2], x[:, :, -1:])
        state = cache.get(self)
        if state is None and x.shape[2] == 0:
            return x
        if state is None:  # stream start: frame 0 passes, frame 1 is its own predecessor
            head, x = x[:, :, :1], x[:, :, 1:]
            behind, held = None, x[:, :, :0]
        else:
            head = x[:, :, :0]
            behind, held = state
        pending = torch.cat([held, x], dim=2)
        emit = pending if cache.final else pending[:, :, :-1]
        ahead = pending[:, :, -1:]  # the next frame, or at the very end the last frame itself
        if emit.shape[2] == 0:
            keep(cache, self, lambda: (behind, pending.clone()))
            return head
        keep(cache, self, lambda: (emit[:, :, -1:].clone(), pending[:, :, emit.shape[2]:].clone()))
        return doubled_in_time(head, emit, behind if behind is not None else emit[:, :, :1], ahead)


class TimeUpsampleRes2x(nn.Module):
    """v1.1.0's learned temporal upsampling: a mix of TimeUpsample2x and a causal conv of it."""

    def __init__(self, cin: int, cout: int, mix_factor: float = 2.0):
        super().__init__()
        self.upsample = TimeUpsample2x()
        self.conv = CausalConv3d(cin, cout, 3, padding=1)
        self.mix_factor = nn.Parameter(torch.tensor([mix_factor]))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = self.upsample(x, cache)
        if x.shape[2] == 0:
            return x
        alpha = torch.sigmoid(self.mix_factor)
        return alpha * x + (1 - alpha) * self.conv(x, cache)


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)
