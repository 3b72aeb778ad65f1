"""What only real weights can show: the built-in model reconstructs real pictures, and gets
measurably worse when the pixels reach it wrongly (colour order, value range). Equality between code
paths is checked here on real content too, where random weights would hide little.

The floors are the shipped model's measured scores (benchmarks/README.md) less a margin: they catch
a broken pixel path, a wrong crop or a damaged weight file, not a retrained model's small changes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cvae_cli import media, stream
from cvae_cli.checkpoints import builtin_weights, default_weights, load_model
from cvae_cli.metrics import psnr
from cvae_cli.convert import decode_file, encode_file, reconstruct_file
from cvae_cli.selection import Selection
from cvae_cli.stream import StreamOptions, decode_latents, encode_frames

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "coffee.jpg"
CLIP = REPO / "examples" / "cockatoo.mp4"
PHOTO_FLOOR = 19.0  # dB at long side 256 (measured: see PHOTO_MEASURED in the module's test)
CLIP_FLOOR = 20.0  # dB over the clip's first 17 frames at long side 256


@pytest.fixture(scope="module")
def model():
    model = load_model(builtin_weights())
    model.requires_grad_(False)  # inference only, without touching torch's global grad mode
    return model


def score(model, src: Path, select: Selection, tmp_path: Path, **options) -> float:
    out = tmp_path / ("out.png" if src.suffix == ".jpg" else "out.mp4")
    result = reconstruct_file(model, src, out, StreamOptions(**options), select)
    return float(np.mean(result.metrics.psnr))


def test_the_built_in_model_is_the_default_and_ships_in_fp16(tmp_path, monkeypatch):
    monkeypatch.setenv("CVAE_HOME", str(tmp_path))  # a user with no weights of their own (never this user's folder)
    path, builtin = default_weights()
    assert builtin and path == builtin_weights() and path.stat().st_size < 20 * 2**20
    state = load_model(path).state_dict()
    assert len(state) > 100
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert meta["init"] == "tail" and int(meta["trained_steps"]) > 0
    assert "recipe" in meta and "data" in meta
    held_out = {k for k in meta if k.startswith("held_out ")}  # evaluate.py's scores, never trained on
    assert held_out == {"held_out photos, long side 256", "held_out photos, long side 512",
                        "held_out clips, long side 256, all frames"}
    assert all(meta[k].startswith("PSNR ") for k in held_out)


def test_a_real_photo_reconstructs_above_the_floor(model, tmp_path):
    assert score(model, PHOTO, Selection(max_side=256), tmp_path) > PHOTO_FLOOR


def test_a_real_clip_reconstructs_above_the_floor(model, tmp_path):
    assert score(model, CLIP, Selection(end=17, max_side=256), tmp_path, chunk=8) > CLIP_FLOOR


def swap_channels(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1)


def wrong_range(x: torch.Tensor) -> torch.Tensor:
    return (x + 1) / 2


def unwrong_range(x: torch.Tensor) -> torch.Tensor:
    return x * 2 - 1


@pytest.mark.parametrize("into, back, loss", [(swap_channels, swap_channels, 1.5), (wrong_range, unwrong_range, 3.0)],
                         ids=["BGR instead of RGB", "[0, 1] instead of [-1, 1]"])
def test_pixels_given_wrongly_reconstruct_clearly_worse(model, tmp_path, monkeypatch, into, back, loss):
    """The mistake is undone on the way out, so only the model sees it: the score drops only
    because the weights learned RGB in [-1, 1]. Random weights would not notice."""
    right = score(model, PHOTO, Selection(max_side=256), tmp_path)
    to_pixels, to_frames = stream.frames_to_pixels, stream.pixels_to_frames
    monkeypatch.setattr(stream, "frames_to_pixels", lambda *a, **k: into(to_pixels(*a, **k)))
    monkeypatch.setattr(stream, "pixels_to_frames", lambda x, *a: to_frames(back(x), *a))
    wrong = score(model, PHOTO, Selection(max_side=256), tmp_path)
    assert wrong < right - loss, (right, wrong)


def frames_of(path: Path) -> np.ndarray:
    return np.stack(list(media.read_frames(path)))


def test_encode_then_decode_writes_what_reconstruct_writes(model, tmp_path):
    select, options = Selection(end=9, max_side=192), StreamOptions(chunk=4)
    encode_file(model, CLIP, tmp_path / "z.safetensors", options, select)
    decode_file(model, tmp_path / "z.safetensors", tmp_path / "decoded.mp4", options, crf=0)
    reconstruct_file(model, CLIP, tmp_path / "recon.mp4", options, select, crf=0)
    decoded, recon = frames_of(tmp_path / "decoded.mp4"), frames_of(tmp_path / "recon.mp4")
    assert decoded.shape == recon.shape == (9, 108, 192, 3)
    assert np.array_equal(decoded, recon)


def test_streaming_equals_the_whole_clip_on_real_frames(model):
    frames = list(media.read_frames(CLIP, end=17, size=(192, 108)))
    results = {}
    for name, options in {"stream": StreamOptions(chunk=4), "whole": StreamOptions(mode="whole")}.items():
        z = torch.cat([mean for mean, _ in encode_frames(model, iter(frames), options)], dim=1)
        out = np.concatenate(list(decode_latents(model, [z], options, 108, 192)))
        results[name] = (z, out)
    (zs, xs), (zw, xw) = results["stream"], results["whole"]
    assert zs.shape == zw.shape == (4, 5, 14, 24)
    assert ((zs - zw).norm() / zw.norm()).item() < 1e-5
    assert np.abs(xs.astype(int) - xw.astype(int)).max() <= 1  # rounding to uint8 at most
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(xs).permute(0, 3, 1, 2).float() / 255
    assert psnr(x, y, data_range=1.0).mean() > CLIP_FLOOR
