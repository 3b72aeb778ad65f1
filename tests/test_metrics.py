"""PSNR/SSIM against hand computation and scikit-image (when installed)."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvae_cli import metrics
from cvae_cli.errors import CvaeError
from cvae_cli.metrics import FrameMetrics, frames_to_tensor, psnr, ssim

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Small float64 ops on many threads crawl on a busy machine (17 s against 0.3 s here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# --- real photos, in bounded memory ------------------------------------------------------------

def real_pair(name="astronaut.png", quality=25):
    """A scikit-image photo and its JPEG at low quality: a real image and a realistic distortion."""
    skimage = pytest.importorskip("skimage")
    from io import BytesIO

    from PIL import Image

    photo = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
    buffer = BytesIO()
    photo.save(buffer, format="JPEG", quality=quality)
    return np.array(photo), np.array(Image.open(buffer).convert("RGB"))


def whole_frame_ssim(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """The SSIM before it went by strips: the whole frame through two convolutions at once."""
    x, y = ref.double(), test.double()
    x, y = x[0].unsqueeze(1), y[0].unsqueeze(1)
    g = torch.exp(-0.5 * ((torch.arange(11, dtype=torch.float64) - 5) / 1.5) ** 2)
    g = g / g.sum()
    stats = torch.cat([x, y, x * x, y * y, x * y])
    mx, my, mxx, myy, mxy = F.conv2d(F.conv2d(stats, g.view(1, 1, 11, 1)), g.view(1, 1, 1, 11)).chunk(5)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * (mxy - mx * my) + c2)) / ((mx * mx + my * my + c1) * (mxx - mx * mx + myy - my * my + c2))
    return s.mean(dim=(1, 2, 3)).mean()


def test_strips_equal_the_whole_frame_and_scikit_image_on_a_real_photo(monkeypatch):
    skm = pytest.importorskip("skimage.metrics")
    ref, test = real_pair("coffee.png")
    a, b = frames_to_tensor(ref), frames_to_tensor(test)
    whole_ssim = whole_frame_ssim(a, b).item()
    whole_psnr = 10 * math.log10(255**2 / np.mean((ref.astype(np.float64) - test) ** 2))
    for pixels, rows in [(2**20, 1), (3000, 7)]:  # one strip, many strips
        monkeypatch.setattr(metrics, "STRIP_PIXELS", pixels)
        monkeypatch.setattr(metrics, "STRIP_ROWS", rows)
        assert ssim(a, b).item() == pytest.approx(whole_ssim, abs=1e-13)
        assert psnr(a, b).item() == pytest.approx(whole_psnr, abs=1e-11)
    want = skm.structural_similarity(ref, test, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     channel_axis=-1, data_range=255)
    assert ssim(a, b).item() == pytest.approx(want, abs=1e-12)
    assert psnr(a, b).item() == pytest.approx(skm.peak_signal_noise_ratio(ref, test, data_range=255), abs=1e-11)
    assert 0.5 < want < 0.97


def test_a_large_frame_is_scored_in_bounded_memory():
    """A 3000x1000 pair's scores add a few MB of resident memory; scored whole (two float64 copies,
    and a convolution unfolding 11 copies of 15 planes) they took 4 GB, and a 6028x3391 photo asked
    for 27 GB and failed after the model's minutes of work."""
    code = textwrap.dedent("""
        import sys, numpy as np, torch
        from cvae_cli.metrics import psnr, ssim
        # VmHWM, not ru_maxrss: Linux keeps the parent's ru_maxrss across exec (pytest's, here)
        hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
        rng = np.random.default_rng(0)
        a = torch.from_numpy(rng.integers(0, 256, (1, 3, 1000, 3000), dtype=np.uint8))
        b = a.clone(); b[..., ::7, ::5] ^= 8  # 8 levels off, in 143 x 600 places a channel
        before = hwm()
        p, s = psnr(a, b).item(), ssim(a, b).item()
        grown = (hwm() - before) / 1024
        print(f"{grown:.0f} {p:.6f} {s:.6f}")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    grown, p, s = map(float, done.stdout.split())
    assert grown < 150, f"scoring grew the resident set by {grown:.0f} MiB"
    assert p == pytest.approx(10 * math.log10(255**2 / (64 * 143 * 600 / 3e6)), abs=1e-5) and 0.5 < s < 1


def test_tiny_frames_get_psnr_and_no_ssim_and_json_gets_no_nan():
    """Frames under 11x11 have no SSIM (its window does not fit): PSNR only, said in the line."""
    ref, test = map(frames_to_tensor, frames(n=2, h=8, w=30))
    m = FrameMetrics()
    m.add(ref, test)
    assert len(m.psnr) == 2 and m.ssim == []
    assert "SSIM n/a" in m.line() and "over 2 frames" in m.line()
    summary = m.summary()
    assert summary["ssim"] is None and summary["ssim_per_frame"] == []
    json.loads(json.dumps(summary, allow_nan=False))
    same = FrameMetrics()
    same.add(ref, ref)
    assert same.summary()["psnr"] is None and same.summary()["psnr_per_frame"] == [None, None]
    assert json.dumps(FrameMetrics().summary(), allow_nan=False)  # empty: nulls, not NaN
