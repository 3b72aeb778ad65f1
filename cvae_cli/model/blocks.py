"""Residual and attention blocks, in 3-D (causal in time) and 2-D (per frame) flavours."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CausalConv3d, GroupNorm, StreamCache, frames_back, frames_first


class ResnetBlock3D(nn.Module):
    """norm, SiLU, causal conv, norm, SiLU, dropout, causal conv; 1x1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0, per_frame: bool = False):
        super().__init__()
        self.norm1 = GroupNorm(cin, per_frame)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(cout, per_frame)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = CausalConv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        # Windowing outside the conv call frees the norm output before the conv runs: at 720p the
        # level-0 activations are ~0.24 GB a frame, so one tensor fewer alive is most of the peak.
        h = self.conv1.conv(self.conv1.window(self.norm1(x, silu=True), cache))
        h = self.conv2.conv(self.conv2.window(self.dropout(self.norm2(h, silu=True)), cache))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x, cache)
        return h.add_(x) if not torch.is_grad_enabled() else x + h


class ResnetBlock2D(nn.Module):
    """The SD image VAE's resnet block applied to every frame; its norms are always per frame."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0, per_frame: bool = True):
        super().__init__()
        self.norm1 = GroupNorm(cin, per_frame=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(cout, per_frame=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        b, x = x.shape[0], frames_first(x)
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.dropout(self.norm2(h, silu=True)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return frames_back(h.add_(x) if not torch.is_grad_enabled() else x + h, b)


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
        """(B, C, T, H, W) -> (B*T, H*W, C): one sequence of pixels per frame."""
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)

    def from_tokens(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, c, t, h, w = shape
        return y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (self.to_tokens(proj(h)) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale C^-0.5, softmax over keys
        return x + self.proj_out(self.from_tokens(out, x.shape).contiguous())


class AttnBlock3D(AttnBlock3DFix):
    """The attention the released checkpoints were trained with, kept bit-faithful.

    Open-Sora-Plan reshapes (B, C, T, H, W) straight to (B*T, C, H*W) without moving T next to B,
    so each "frame" it attends within is really a slice across channels and time: the result
    depends on the whole clip (or, when streaming, the whole chunk). Loading the checkpoints
    exactly means reproducing that; `AttnBlock3DFix` is the per-frame attention it meant.
    """

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        return x.reshape(b * t, c, h * w).transpose(1, 2)

    def from_tokens(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return y.transpose(1, 2).reshape(shape)
