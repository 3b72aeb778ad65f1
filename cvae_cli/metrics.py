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

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .errors import CvaeError

_WIN, _SIGMA, _K1, _K2 = 11, 1.5, 0.01, 0.03
SSIM_MIN_SIDE = _WIN  # SSIM's window must fit inside a frame


def frames_to_tensor(frames: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """numpy uint8 (H, W, 3), (N, H, W, 3) or a list of (H, W, 3) -> uint8 tensor (N, 3, H, W)."""
    a = np.stack(frames) if isinstance(frames, (list, tuple)) else np.asarray(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (N, H, W, 3) frames, got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


STRIP_PIXELS = 2**16  # pixels of one plane in a strip of rows: bounds a score's memory, stays in cache
STRIP_ROWS = 32  # rows a strip holds at least, so that a wide frame's halo rows are few of them


def _prepare(ref: torch.Tensor, test: torch.Tensor, data_range: float | None) -> float:
    if ref.shape != test.shape or ref.ndim != 4 or ref.shape[1] != 3:
        raise ValueError(f"expected two (N, 3, H, W) tensors of one shape, got "
                         f"{tuple(ref.shape)} and {tuple(test.shape)}")
    if data_range is None:
        if ref.dtype != torch.uint8 or test.dtype != torch.uint8:
            raise ValueError("float frames need an explicit data_range")
        data_range = 255.0
    return float(data_range)


def _strips(height: int, width: int, halo: int = 0) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of a map `halo` rows shorter than the frame, each strip (with its halo)
    about STRIP_PIXELS pixels, or STRIP_ROWS rows: a frame's float64 copies never exist whole."""
    rows = max(STRIP_ROWS, STRIP_PIXELS // max(width, 1) - halo)
    return [(r, min(r + rows, height - halo)) for r in range(0, height - halo, rows)]


def psnr(ref: torch.Tensor, test: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Per-frame PSNR in dB, shape (N,), float64; identical frames give +inf."""
    r = _prepare(ref, test, data_range)
    n, _, h, w = ref.shape
    sse = torch.zeros(n, dtype=torch.float64, device=ref.device)
    for r0, r1 in _strips(h, w):
        a = ref[..., r0:r1, :].to(torch.float64)
        sse += (a - test[..., r0:r1, :].to(a.device, torch.float64)).pow(2).sum(dim=(1, 2, 3))
    return 10 * torch.log10(r * r / (sse / (3 * h * w)))  # mse 0 -> inf


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(_WIN, dtype=torch.float64, device=device) - _WIN // 2
    g = torch.exp(-0.5 * (x / _SIGMA) ** 2)
    return g / g.sum()


def _blur(x: torch.Tensor, g: list[float]) -> torch.Tensor:
    """The Gaussian window's weighted means over every position where it fits: (h, w) -> (h-10, w-10).
    Separable, as shifted multiply-adds (a convolution would unfold 11 copies of its input)."""
    h, w = x.shape[-2] - _WIN + 1, x.shape[-1] - _WIN + 1
    rows = x[:h] * g[0]
    for k in range(1, _WIN):
        rows.add_(x[k:k + h], alpha=g[k])
    out = rows[:, :w] * g[0]
    for k in range(1, _WIN):
        out.add_(rows[:, k:k + w], alpha=g[k])
    return out


def ssim(ref: torch.Tensor, test: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Per-frame SSIM, shape (N,), float64 (see the module docstring for the definition).

    Scored by strips of rows, each with the window's 10 extra rows, one channel at a time, so
    memory stays near STRIP_PIXELS whatever the frame size (a 6028x3391 photo scored whole asked
    for 27 GB); every value of the SSIM map is the whole frame's, only the final sum's order differs."""
    r = _prepare(ref, test, data_range)
    n, _, h, w = ref.shape
    if min(h, w) < _WIN:
        raise CvaeError(f"SSIM needs frames of at least {_WIN}x{_WIN} pixels, got {h}x{w}")
    g = _gaussian_window(ref.device).tolist()
    c1, c2 = (_K1 * r) ** 2, (_K2 * r) ** 2
    total = torch.zeros(n, 3, dtype=torch.float64, device=ref.device)
    for i, c in itertools.product(range(n), range(3)):
        for r0, r1 in _strips(h, w, halo=_WIN - 1):
            x = ref[i, c, r0:r1 + _WIN - 1].to(torch.float64)
            y = test[i, c, r0:r1 + _WIN - 1].to(x.device, torch.float64)
            mx, my, mxx, myy, mxy = (_blur(t, g) for t in (x, y, x * x, y * y, x * y))
            vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
            total[i, c] += s.sum()
    return (total / ((h - _WIN + 1) * (w - _WIN + 1))).mean(dim=1)  # per channel, then over channels


@dataclass
class FrameMetrics:
    """Per-frame PSNR/SSIM gathered chunk by chunk, with means for the report. Frames under 11x11
    pixels get PSNR only: SSIM's window does not fit them (`ssim` stays empty)."""

    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)

    def add(self, ref: torch.Tensor, test: torch.Tensor, data_range: float | None = None) -> None:
        self.psnr += psnr(ref, test, data_range).tolist()
        if min(ref.shape[-2:]) >= SSIM_MIN_SIDE:
            self.ssim += ssim(ref, test, data_range).tolist()

    @property
    def mean_psnr(self) -> float:
        """Mean of per-frame PSNR (inf if any frame is identical); nan when empty."""
        return sum(self.psnr) / len(self.psnr) if self.psnr else math.nan

    @property
    def mean_ssim(self) -> float:
        """nan when no frame was scored (none, or all under 11x11 pixels)."""
        return sum(self.ssim) / len(self.ssim) if self.ssim else math.nan

    def line(self) -> str:
        """The one-line report: `PSNR 30.12 dB, SSIM 0.8765 over 3 frames`."""
        frames = f"{len(self.psnr)} frame{'' if len(self.psnr) == 1 else 's'}"
        ssim_text = f"SSIM {self.mean_ssim:.4f}" if self.ssim else f"SSIM n/a (under {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} pixels)"
        return f"PSNR {self.mean_psnr:.2f} dB, {ssim_text} over {frames}"

    def summary(self) -> dict:
        """Means and per-frame values, valid JSON: a value that is not a finite number (the PSNR of
        identical frames, an SSIM that does not fit) is null."""
        return {"frames": len(self.psnr), "psnr": _finite(self.mean_psnr), "ssim": _finite(self.mean_ssim),
                "psnr_per_frame": [_finite(v) for v in self.psnr],
                "ssim_per_frame": [_finite(v) for v in self.ssim]}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
