"""Residual and attention blocks, in 3-D (causal in time) and 2-D (per frame) flavours."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CausalConv3d, GroupNorm, StreamCache, frames_back, frames_first


def residual(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + h, written into h when nothing records the graph (h is the block's own, one tensor less)."""
    return x + h if torch.is_grad_enabled() else h.add_(x)


class ResnetBlock3D(nn.Module):
    """norm, SiLU, causal conv, norm, SiLU, dropout, causal conv; 1x1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0, per_frame: bool = False):
        super().__init__()
        self.norm1 = GroupNorm(cin, per_frame)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(cout, per_frame)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.nin_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.norm1(x, silu=True)
        h = self.conv1(h, cache)
        h = self.norm2(h, silu=True)
        h = self.dropout(h)
        h = self.conv2(h, cache)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x, cache)
        return residual(x, h)


class ResnetBlock2D(nn.Module):
    """The SD image VAE's resnet block applied to every frame; its norms are always per frame."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0, per_frame: bool = True):
        super().__init__()
        self.norm1 = GroupNorm(cin, per_frame=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(cout, per_frame=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        b, x = x.shape[0], frames_first(x)
        h = self.norm1(x, silu=True)
        h = self.conv1(h)
        h = self.norm2(h, silu=True)
        h = self.dropout(h)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return frames_back(residual(x, h), b)


class AttnBlock3DFix(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual connection."""

    def __init__(self, channels: int, per_frame: bool = False):
        super().__init__()
        self.norm = GroupNorm(channels, per_frame)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B*T, 1, H*W, C): one single-head sequence of pixels per frame, in the
        (batch, heads, tokens, channels) layout that SDPA's fused kernels take, contiguous: given a
        view with strided channels SDPA falls back to its math path, which holds the whole tokens x
        tokens matrix (measured: benchmarks/README.md)."""
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c).contiguous()

    def from_tokens(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, c, t, h, w = shape
        return y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (self.to_tokens(proj(h)) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # scale C^-0.5, softmax over keys
        h = self.proj_out(self.from_tokens(h, x.shape).contiguous())
        return residual(x, h)


class AttnBlock3D(AttnBlock3DFix):
    """The attention the released checkpoints were trained with, kept bit-faithful.

    Open-Sora-Plan reshapes (B, C, T, H, W) straight to (B*T, C, H*W) without moving T next to B,
    so each "frame" it attends within is really a slice across channels and time: the result
    depends on the whole clip (or, when streaming, the whole chunk). Loading the checkpoints
    exactly means reproducing that; `AttnBlock3DFix` is the per-frame attention it meant.
    """

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        return x.reshape(b * t, 1, c, h * w).transpose(2, 3).contiguous()

    def from_tokens(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return y.transpose(2, 3).reshape(shape)
