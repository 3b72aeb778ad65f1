"""PSNR and SSIM per frame, in torch, so reconstruction quality is measured with no extra deps.

Convention: frames are tensors (N, 3, H, W), uint8 (data range 255) or float (pass `data_range`,
e.g. 2.0 for the model's [-1, 1]); `frames_to_tensor` turns numpy uint8 (H, W, 3) frames into that.
SSIM is Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, population
(co)variances, the SSIM map averaged over the positions where the window fits inside the image,
computed per RGB channel and averaged. That is exactly scikit-image's
`structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
channel_axis=-1, data_range=255)`. Everything is computed in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CvaeError

_WIN, _SIGMA, _K1, _K2 = 11, 1.5, 0.01, 0.03


def frames_to_tensor(frames: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """numpy uint8 (H, W, 3), (N, H, W, 3) or a list of (H, W, 3) -> uint8 tensor (N, 3, H, W)."""
    a = np.stack(frames) if isinstance(frames, (list, tuple)) else np.asarray(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (N, H, W, 3) frames, got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _prepare(ref: torch.Tensor, test: torch.Tensor, data_range: float | None):
    if ref.shape != test.shape or ref.ndim != 4 or ref.shape[1] != 3:
        raise ValueError(f"expected two (N, 3, H, W) tensors of one shape, got "
                         f"{tuple(ref.shape)} and {tuple(test.shape)}")
    if data_range is None:
        if ref.dtype != torch.uint8 or test.dtype != torch.uint8:
            raise ValueError("float frames need an explicit data_range")
        data_range = 255.0
    return ref.to(torch.float64), test.to(ref.device, torch.float64), float(data_range)


def psnr(ref: torch.Tensor, test: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Per-frame PSNR in dB, shape (N,), float64; identical frames give +inf."""
    ref, test, r = _prepare(ref, test, data_range)
    mse = (ref - test).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(r * r / mse)  # mse 0 -> inf


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(_WIN, dtype=torch.float64, device=device) - _WIN // 2
    g = torch.exp(-0.5 * (x / _SIGMA) ** 2)
    return g / g.sum()


def ssim(ref: torch.Tensor, test: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Per-frame SSIM, shape (N,), float64 (see the module docstring for the definition)."""
    ref, test, r = _prepare(ref, test, data_range)
    if min(ref.shape[-2:]) < _WIN:
        raise CvaeError(f"SSIM needs frames of at least {_WIN}x{_WIN} pixels, got {ref.shape[-2]}x{ref.shape[-1]}")
    g = _gaussian_window(ref.device)
    gh, gw = g.view(1, 1, _WIN, 1), g.view(1, 1, 1, _WIN)
    c1, c2 = (_K1 * r) ** 2, (_K2 * r) ** 2
    out = []
    for x, y in zip(ref, test):  # one frame at a time keeps memory small for big frames
        x, y = x.unsqueeze(1), y.unsqueeze(1)  # (3, 1, H, W): channels as a batch
        stats = torch.cat([x, y, x * x, y * y, x * y])
        mx, my, mxx, myy, mxy = F.conv2d(F.conv2d(stats, gh), gw).chunk(5)
        vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s.mean(dim=(1, 2, 3)).mean())  # per channel, then over channels
    return torch.stack(out)


@dataclass
class FrameMetrics:
    """Per-frame PSNR/SSIM gathered chunk by chunk, with means for the report."""

    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)

    def add(self, ref: torch.Tensor, test: torch.Tensor, data_range: float | None = None) -> None:
        self.psnr += psnr(ref, test, data_range).tolist()
        self.ssim += ssim(ref, test, data_range).tolist()

    @property
    def mean_psnr(self) -> float:
        """Mean of per-frame PSNR (inf if any frame is identical); nan when empty."""
        return sum(self.psnr) / len(self.psnr) if self.psnr else math.nan

    @property
    def mean_ssim(self) -> float:
        return sum(self.ssim) / len(self.ssim) if self.ssim else math.nan

    def summary(self) -> dict[str, float]:
        return {"frames": len(self.psnr), "psnr": self.mean_psnr, "ssim": self.mean_ssim}
