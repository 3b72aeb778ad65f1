"""PSNR/SSIM against hand computation and scikit-image (when installed)."""
import math

import numpy as np
import pytest
import torch

from cvae_cli.errors import CvaeError
from cvae_cli.metrics import FrameMetrics, frames_to_tensor, psnr, ssim


def frames(n=2, h=40, w=52, seed=0):
    """Smooth-ish uint8 frames (N, H, W, 3) plus a noisy copy."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 7 + c + k) * np.cos(yy / 5 - k)
                     for k in range(n) for c in range(3)]).reshape(n, 3, h, w).transpose(0, 2, 3, 1)
    ref = np.clip(base, 0, 255).astype(np.uint8)
    test = np.clip(ref + rng.normal(0, 12, ref.shape), 0, 255).astype(np.uint8)
    return ref, test


def test_frames_to_tensor():
    ref, _ = frames()
    t = frames_to_tensor(ref)
    assert t.shape == (2, 3, 40, 52) and t.dtype == torch.uint8
    assert torch.equal(frames_to_tensor(ref[0]), t[:1])
    assert torch.equal(frames_to_tensor(list(ref)), t)
    assert np.array_equal(t[1, 2].numpy(), ref[1, :, :, 2])


def test_identical():
    ref, _ = frames()
    t = frames_to_tensor(ref)
    assert torch.isinf(psnr(t, t)).all()
    assert torch.allclose(ssim(t, t), torch.ones(2, dtype=torch.float64))


def test_psnr_by_hand():
    ref, test = frames()
    got = psnr(frames_to_tensor(ref), frames_to_tensor(test))
    for i in range(2):
        mse = np.mean((ref[i].astype(np.float64) - test[i]) ** 2)
        assert abs(got[i].item() - 10 * math.log10(255**2 / mse)) < 0.01
    assert 20 < got.min() < 35


def test_float_needs_range_and_matches_uint8():
    ref, test = map(frames_to_tensor, frames())
    with pytest.raises(ValueError):
        psnr(ref.float(), test.float())
    to_pm1 = lambda x: x.float() / 127.5 - 1  # noqa: E731  (PSNR ignores shifts, SSIM only scales)
    assert torch.allclose(psnr(to_pm1(ref), to_pm1(test), data_range=2.0), psnr(ref, test), atol=1e-4)
    to_01 = lambda x: x.double() / 255  # noqa: E731
    assert torch.allclose(ssim(to_01(ref), to_01(test), data_range=1.0), ssim(ref, test), atol=1e-9)


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    ref, test = frames(n=3, h=37, w=61, seed=1)
    got = ssim(frames_to_tensor(ref), frames_to_tensor(test))
    for i in range(3):
        want = skm.structural_similarity(ref[i], test[i], gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, channel_axis=-1, data_range=255)
        assert abs(got[i].item() - want) < 1e-4
    assert 0.2 < got.min() < got.max() < 0.99


def test_ssim_rejects_tiny_frames_and_bad_shapes():
    t = torch.zeros(1, 3, 10, 40, dtype=torch.uint8)
    with pytest.raises(CvaeError, match="at least 11x11"):
        ssim(t, t)
    with pytest.raises(ValueError):
        psnr(t, t[:, :, :, :20])


def test_frame_metrics_accumulates():
    ref, test = map(frames_to_tensor, frames(n=3))
    m = FrameMetrics()
    assert math.isnan(m.mean_psnr)
    m.add(ref[:2], test[:2])
    m.add(ref[2:], test[2:])
    assert len(m.psnr) == len(m.ssim) == 3
    assert m.mean_psnr == pytest.approx(psnr(ref, test).mean().item())
    assert m.mean_ssim == pytest.approx(ssim(ref, test).mean().item())
    assert m.summary()["frames"] == 3
