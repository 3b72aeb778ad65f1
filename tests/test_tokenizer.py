"""The Tokenizer a Python user drives: the same files as the commands, bit for bit, and the same in memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cvae_cli import Tokenizer, media
from cvae_cli.cli import app
from cvae_cli.errors import CvaeError
from cvae_cli.latents import LatentFile
from conftest import clip, make_video

runner = CliRunner()


def cvae(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def tok(weights):
    return Tokenizer.load(weights, device="cpu", chunk=4)


def test_encode_and_decode_write_what_the_commands_write(tmp_path, weights, tok):
    video = make_video(tmp_path / "v.mp4", frames=9, width=40, height=24)
    cvae("encode", video, "-o", tmp_path / "cli.safetensors", "-w", weights, "--device", "cpu", "--chunk", "4",
         "--frames", "1:9")
    result = tok.encode(video, tmp_path / "lib.safetensors", start=1, end=9)
    assert result.frames == 8
    assert (tmp_path / "lib.safetensors").read_bytes() == (tmp_path / "cli.safetensors").read_bytes()
    cvae("decode", tmp_path / "cli.safetensors", "-o", tmp_path / "cli.mp4", "-w", weights, "--device", "cpu",
         "--chunk", "4")
    tok.decode(tmp_path / "lib.safetensors", tmp_path / "lib.mp4")
    assert (tmp_path / "lib.mp4").read_bytes() == (tmp_path / "cli.mp4").read_bytes()


def test_default_names_sit_beside_the_input_and_nothing_is_written_over(tmp_path, tok):
    media.write_image(tmp_path / "p.png", clip(1, 24, 40)[0])
    assert tok.encode(tmp_path / "p.png").output == tmp_path / "p.safetensors"
    assert tok.decode(tmp_path / "p.safetensors").output == tmp_path / "p.decoded.png"
    result = tok.reconstruct(tmp_path / "p.png")
    assert result.output == tmp_path / "p.recon.png" and len(result.metrics.psnr) == 1
    with pytest.raises(CvaeError, match="p.safetensors exists: pass overwrite=True"):
        tok.encode(tmp_path / "p.png")
    with pytest.raises(CvaeError, match="is an input of this command"):
        tok.encode(tmp_path / "p.png", tmp_path / "p.png", overwrite=True)


def test_in_memory_forms_equal_the_files(tmp_path, tok):
    frames = clip(9, 24, 40)
    latent = tok.encode_frames(np.stack(frames))
    assert latent.shape == (4, 3, 3, 5) and latent.dtype == torch.float32
    video = tmp_path / "v.mp4"
    with media.VideoWriter(video, 24, 40, 24, crf=0) as w:
        for f in frames:
            w.write(f)
    tok.encode(video, tmp_path / "v.safetensors")
    on_file = LatentFile.open(tmp_path / "v.safetensors").read()
    source = np.stack(list(media.read_frames(video)))
    assert torch.equal(tok.encode_frames(source), on_file)
    sample = tok.encode_frames(source, seed=3)
    tok.encode(video, tmp_path / "s.safetensors", seed=3)
    assert torch.equal(sample, LatentFile.open(tmp_path / "s.safetensors").read()) and not torch.equal(sample, on_file)
    out = tok.decode_latent(on_file)
    assert out.shape == (9, 24, 40, 3) and out.dtype == np.uint8
    media.write_image(tmp_path / "p.png", frames[0])
    tok.encode(tmp_path / "p.png", tmp_path / "p.safetensors")
    tok.decode(tmp_path / "p.safetensors", tmp_path / "p.out.png")
    one = tok.decode_latent(tok.encode_frames([frames[0]]))
    assert np.array_equal(one[0], next(media.read_frames(tmp_path / "p.out.png")))


def test_load_says_what_it_chose(tmp_path, monkeypatch):
    monkeypatch.setenv("CVAE_HOME", str(tmp_path))  # no weights of the user's own: the built-in model
    tok = Tokenizer.load(device="cpu")
    assert len(tok.notes) == 1 and "built-in small model" in tok.notes[0] and tok.warnings == []
    assert tok.device == torch.device("cpu") and tok.dtype == torch.float32 and len(tok.model_id) == 12


def test_a_bad_cut_is_refused_before_loading(tmp_path):
    with pytest.raises(CvaeError, match="chunk must be a positive multiple of 4"):
        Tokenizer.load(tmp_path / "nothing.safetensors", chunk=6)
    with pytest.raises(CvaeError, match="--mode sideways: use auto, stream, window, whole"):
        Tokenizer.load(tmp_path / "nothing.safetensors", mode="sideways")


def test_a_tiled_photo_reports_progress_by_tiles_and_ends_at_exactly_one_frame(tmp_path, weights):
    """A large photo is one frame and one step each way through the model: its count moved from 0 to
    1 only at the end, minutes later. Each tile now moves it, below 1 until the frame is done."""
    tok = Tokenizer.load(weights, device="cpu", tile=64)
    media.write_image(tmp_path / "p.png", np.random.default_rng(0).integers(0, 256, (96, 160, 3), np.uint8))
    for run in (lambda progress: tok.encode(tmp_path / "p.png", tmp_path / "p.safetensors", progress=progress),
                lambda progress: tok.decode(tmp_path / "p.safetensors", tmp_path / "p.out.png", progress=progress),
                lambda progress: tok.reconstruct(tmp_path / "p.png", tmp_path / "p.recon.png", progress=progress)):
        steps: list[float] = []
        run(steps.append)
        total = np.cumsum(steps)
        assert len(steps) > 3 and (np.diff(total) > 0).all(), steps  # tile by tile, never backwards
        assert 0 < total[0] < 0.5 and total[-2] <= 0.99 and total[-1] == 1.0, steps
