"""The command line as a user runs it: round trips, many inputs, and one-line errors with no output left."""
from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cvae_cli import convert, media
from cvae_cli.checkpoints import save_model
from cvae_cli.cli import app
from cvae_cli.latents import LatentFile
from conftest import REPO, make_video, put_in_cache, random_model, rel_err

runner = CliRunner()


def cvae(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    return save_model(random_model(seed=5, norm="frame"), tmp_path_factory.mktemp("w") / "other.safetensors")


def test_video_round_trips_with_frame_count_fps_and_odd_size(tmp_path, weights):
    video = make_video(tmp_path / "in.mp4", frames=13, width=94, height=70)
    r = cvae("encode", video, "-o", tmp_path / "z.safetensors", "-w", weights, "--chunk", "4")
    assert r.exit_code == 0, r.output
    latent = LatentFile.open(tmp_path / "z.safetensors")
    assert latent.shape == (4, 4, 9, 12) and latent.meta.frames == 13 and latent.meta.fps == 24
    r = cvae("decode", tmp_path / "z.safetensors", "-o", tmp_path / "out.mp4", "-w", weights)
    assert r.exit_code == 0, r.output
    info = media.probe(tmp_path / "out.mp4")
    assert (info.width, info.height, info.fps) == (94, 70, Fraction(24))
    assert len(list(media.read_frames(tmp_path / "out.mp4"))) == 13


VFR_TIMES = [Fraction(n, 60) for n in (0, 2, 4, 10, 12, 26, 28, 29, 31)]  # seconds: 30 fps with gaps


def make_vfr_video(path: Path, times=VFR_TIMES, width: int = 64, height: int = 48) -> Path:
    tb = Fraction(1, 90000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = stream.time_base = tb
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(t / tb), tb
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def frame_times(path: Path) -> list[Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = sorted(frame.pts * stream.time_base for frame in container.decode(stream))
    return [t - times[0] for t in times]


def test_variable_frame_rate_keeps_its_timestamps(tmp_path, weights):
    video = make_vfr_video(tmp_path / "vfr.mp4")
    assert frame_times(video) == VFR_TIMES
    assert cvae("encode", video, "-w", weights).exit_code == 0
    meta = LatentFile.open(tmp_path / "vfr.safetensors").meta
    assert meta.frame_times == tuple(VFR_TIMES) and meta.frames == 9
    r = cvae("info", tmp_path / "vfr.safetensors")
    assert "frame_times: 9 times over 0.517 s (variable frame rate)" in r.output
    assert cvae("decode", tmp_path / "vfr.safetensors", "-o", tmp_path / "out.mp4", "-w", weights).exit_code == 0
    assert frame_times(tmp_path / "out.mp4") == VFR_TIMES
    assert cvae("reconstruct", video, "-w", weights).exit_code == 0
    assert frame_times(tmp_path / "vfr.recon.mp4") == VFR_TIMES
    assert cvae("encode", video, "-o", tmp_path / "part.safetensors", "-w", weights, "--frames", "3:7").exit_code == 0
    assert LatentFile.open(tmp_path / "part.safetensors").meta.frame_times == tuple(t - VFR_TIMES[3] for t in VFR_TIMES[3:7])
    # resampled to a constant rate, or a constant rate to begin with: no times are stored
    assert cvae("encode", video, "-o", tmp_path / "cfr.safetensors", "-w", weights, "--fps", "30").exit_code == 0
    assert LatentFile.open(tmp_path / "cfr.safetensors").meta.frame_times is None
    assert cvae("encode", make_video(tmp_path / "c.mp4", frames=5), "-w", weights).exit_code == 0
    assert LatentFile.open(tmp_path / "c.safetensors").meta.frame_times is None


def test_image_round_trips_to_png_and_reconstruct_reports_metrics(tmp_path, weights):
    media.write_image(tmp_path / "img.png", np.random.default_rng(1).integers(0, 256, (37, 45, 3), dtype=np.uint8))
    assert cvae("encode", tmp_path / "img.png", "-w", weights).exit_code == 0
    assert LatentFile.open(tmp_path / "img.safetensors").meta.fps is None
    r = cvae("decode", tmp_path / "img.safetensors", "-w", weights)
    assert r.exit_code == 0, r.output
    assert next(media.read_frames(tmp_path / "img.decoded.png")).shape == (37, 45, 3)
    r = cvae("reconstruct", tmp_path / "img.png", "-w", weights, "--metrics-json", tmp_path / "m.json", "--side-by-side")
    assert r.exit_code == 0, r.output
    assert "img.png: PSNR " in r.output and " dB, SSIM " in r.output and "over 1 frame\n" in r.output
    assert next(media.read_frames(tmp_path / "img.recon.png")).shape == (37, 90, 3)
    report = json.loads((tmp_path / "m.json").read_text())[str(tmp_path / "img.png")]
    assert report["frames"] == 1 and 0 < report["psnr"] < 60


def test_many_inputs_go_on_after_a_failure_and_summarize(tmp_path, weights):
    make_video(tmp_path / "a.mp4", frames=5)
    (tmp_path / "b.mp4").write_text("not a video")
    make_video(tmp_path / "c.mp4", frames=5)
    r = cvae("encode", tmp_path / "*.mp4", "--out-dir", tmp_path / "z", "-w", weights)
    assert r.exit_code == 1
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["a.safetensors", "c.safetensors"]
    assert "2 done, 0 skipped, 1 failed" in r.output and "b.mp4" in r.output
    r = cvae("encode", tmp_path / "a.mp4", tmp_path / "c.mp4", "--out-dir", tmp_path / "z", "-w", weights)
    assert r.exit_code == 0 and "0 done, 2 skipped" in r.output


def test_auto_keeps_whole_frames_that_fit_the_budget(tmp_path, weights, monkeypatch):
    """`--tile auto` keeps whole frames where they fit the memory budget, photo and video, encoding
    and decoding alike (tiles where they do not: tests/test_budget.py); a tile asked for is used."""
    cuts = []
    for name in ("encode_batch", "decode_latents"):
        real = getattr(convert, name)
        monkeypatch.setattr(convert, name, lambda model, items, options, *a, real=real, **k: cuts.append(options.tile)
                            or real(model, items, options, *a, **k))
    make_video(tmp_path / "v.mp4", frames=5)
    media.write_image(tmp_path / "p.png", np.full((70, 94, 3), 90, np.uint8))
    for name in ("v.mp4", "p.png"):
        z = tmp_path / f"{name}.safetensors"
        assert cvae("encode", tmp_path / name, "-o", z, "-w", weights, "--memory-budget", "4GiB").exit_code == 0
        assert cvae("decode", z, "-o", tmp_path / f"out-{name}", "-w", weights).exit_code == 0
    assert cuts == [None, None, None, None]
    assert cvae("encode", tmp_path / "v.mp4", "-o", tmp_path / "t.safetensors", "-w", weights,
                "--tile", "64").exit_code == 0 and cuts[-1] == 64  # asked for: tiled


def test_batched_encode_equals_one_by_one_and_isolates_a_broken_input(tmp_path, weights, monkeypatch):
    batches = []
    real = convert.encode_batch
    monkeypatch.setattr(convert, "encode_batch", lambda model, clips, *a, **k: batches.append(len(clips)) or real(model, clips, *a, **k))
    for i, n in enumerate((5, 13, 9)):
        make_video(tmp_path / f"v{i}.mp4", frames=n, seed=i)
    make_video(tmp_path / "small.mp4", frames=5, width=64, height=48)  # another size: a batch of its own
    media.write_image(tmp_path / "still.png", np.full((70, 94, 3), 90, np.uint8))  # an image joins videos
    cut = make_video(tmp_path / "cut.mp4", frames=40, seed=4)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 6 // 10])
    args = [tmp_path / "*.mp4", tmp_path / "still.png", "-w", weights, "--chunk", "4"]
    one = cvae("encode", *args, "--out-dir", tmp_path / "one")
    many = cvae("encode", *args, "--out-dir", tmp_path / "many", "--batch-size", "5")
    assert batches == [1] * 6 + [5, 1]  # cut, v0..v2 and still.png at 94x70 together; small.mp4 alone
    for r in (one, many):
        assert r.exit_code == 1 and "5 done, 0 skipped, 1 failed" in r.output, r.output
        assert "cut.mp4" in r.output and "corrupt or truncated" in r.output
    names = ["small.safetensors", "still.safetensors", "v0.safetensors", "v1.safetensors", "v2.safetensors"]
    for folder in ("one", "many"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == names  # nothing of cut.mp4
    for name in names:
        a, b = LatentFile.open(tmp_path / "one" / name), LatentFile.open(tmp_path / "many" / name)
        assert a.meta == b.meta
        assert rel_err(b.read(), a.read()) < 1e-5


def assert_one_line_error(r, *fragments: str):
    assert r.exit_code != 0
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in r.output


def test_missing_input(tmp_path, weights):
    assert_one_line_error(cvae("encode", tmp_path / "nope.mp4", "-o", tmp_path / "z.safetensors", "-w", weights),
                          "no such file")
    assert not (tmp_path / "z.safetensors").exists()


def test_not_media(tmp_path, weights):
    (tmp_path / "notes.mp4").write_text("hello")
    assert_one_line_error(cvae("encode", tmp_path / "notes.mp4", "-w", weights), "not an image or video")
    assert not (tmp_path / "notes.safetensors").exists()


def test_truncated_video_fails_unless_partial_is_allowed(tmp_path, weights):
    video = make_video(tmp_path / "cut.mp4", frames=40, width=160, height=128)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) * 6 // 10])  # the index comes first, so it survives the cut
    assert_one_line_error(cvae("encode", video, "-w", weights), "corrupt or truncated", "--allow-partial")
    assert not (tmp_path / "cut.safetensors").exists()
    assert cvae("encode", video, "-w", weights, "--allow-partial").exit_code == 0
    assert 0 < LatentFile.open(tmp_path / "cut.safetensors").meta.frames < 40


def test_latent_from_other_weights_is_refused_unless_forced(tmp_path, weights, other_weights):
    make_video(tmp_path / "v.mp4", frames=5)
    assert cvae("encode", tmp_path / "v.mp4", "-w", weights).exit_code == 0
    r = cvae("decode", tmp_path / "v.safetensors", "-o", tmp_path / "out.mp4", "-w", other_weights)
    assert_one_line_error(r, "was encoded with weights", "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4", "v.safetensors"]
    assert cvae("decode", tmp_path / "v.safetensors", "-o", tmp_path / "forced.mp4", "-w", other_weights,
                "--force").exit_code == 0


def test_wrong_latent_file(tmp_path, weights):
    save_file({"latent": torch.zeros(4, 1, 2, 2)}, str(tmp_path / "plain.safetensors"))
    assert_one_line_error(cvae("decode", tmp_path / "plain.safetensors", "-w", weights), "not a cvae latent file")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{junk")
    assert_one_line_error(cvae("decode", tmp_path / "junk.safetensors", "-w", weights), "not a readable safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors", "plain.safetensors"]


def test_unwritable_output(tmp_path, weights):
    make_video(tmp_path / "v.mp4", frames=5)
    (tmp_path / "file").write_text("")
    assert_one_line_error(cvae("encode", tmp_path / "v.mp4", "-o", tmp_path / "file" / "z.safetensors", "-w", weights),
                          "cannot write")


def test_without_inflated_weights_the_built_in_model_is_used_and_said(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CVAE_HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv("CVAE_WEIGHTS", raising=False)
    media.write_image(tmp_path / "img.png", np.zeros((16, 16, 3), np.uint8))
    r = cvae("encode", "img.png")
    assert r.exit_code == 0, r.output
    assert "built-in small model" in r.output and "cvae inflate" in r.output
    assert LatentFile.open(tmp_path / "img.safetensors").meta.frames == 1
    quiet = cvae("encode", "img.png", "-o", "q.safetensors", "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a hub endpoint that refuses connections, as a machine
    without a network sees it; huggingface-hub reads its settings at import, hence the patches."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    return cache


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory) -> Path:
    """A tiny SD image VAE in the diffusers layout."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4)
    path = tmp_path_factory.mktemp("sd") / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path


def test_inflate_offline_is_one_quick_line_that_says_how_to_pass_a_local_file(tmp_path, no_network):
    r = cvae("inflate", "-o", tmp_path / "w.safetensors")
    assert_one_line_error(r, "cannot reach the Hugging Face hub", "not in the local cache", "--from")
    assert "Retry" not in r.output and not (tmp_path / "w.safetensors").exists()


def test_inflate_takes_the_cached_sd_vae_without_asking_the_network(tmp_path, no_network, sd_vae):
    put_in_cache(no_network, "stabilityai/sd-vae-ft-mse", {"diffusion_pytorch_model.safetensors": sd_vae})
    r = cvae("inflate", "-o", tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'w.safetensors'}" in r.output


def test_a_missing_input_is_reported_before_any_weights_are_fetched(tmp_path, no_network):
    r = cvae("encode", tmp_path / "nope.mp4", "-w", "owner/not-cached/vae")
    assert_one_line_error(r, "no such file", "nope.mp4")


def test_inflate_keeps_existing_weights_unless_overwrite(tmp_path, sd_vae):
    existing = tmp_path / "w.safetensors"
    existing.write_bytes(b"old weights")
    assert_one_line_error(cvae("inflate", "--from", sd_vae, "-o", existing), "exists", "--overwrite")
    assert existing.read_bytes() == b"old weights"
    assert_one_line_error(cvae("inflate", "--from", sd_vae, "-o", tmp_path / "w.bin"),
                          "weights are written as .safetensors")
    assert cvae("inflate", "--from", sd_vae, "-o", existing, "--overwrite").exit_code == 0
    assert existing.read_bytes() != b"old weights"


def test_inflate_from_local_file_and_info(tmp_path, sd_vae):
    r = cvae("inflate", "--from", sd_vae, "--init", "center", "-o", tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.output
    assert "w.safetensors" in r.output and "MiB" in r.output
    r = cvae("info", tmp_path / "w.safetensors")
    assert r.exit_code == 0 and "init: center" in r.output and "parameters" in r.output


def test_unknown_weight_layout(tmp_path):
    save_file({"something.else": torch.zeros(3)}, str(tmp_path / "odd.safetensors"))
    assert_one_line_error(cvae("inflate", "--from", tmp_path / "odd.safetensors", "-o", tmp_path / "w.safetensors"),
                          "not an SD VAE")
    assert not (tmp_path / "w.safetensors").exists()


def test_every_example_in_help_parses():
    """Each command's --help shows examples, and each example is a command line its parser takes
    (options that exist, with values of the right kind), so the help cannot drift from the options."""
    import shlex

    import typer.main

    group = typer.main.get_command(app)
    for name in ("encode", "decode", "reconstruct", "inflate", "info", "train", "bench"):
        command = group.commands[name]
        examples = [line.split("#")[0].strip() for line in (command.help or "").splitlines()
                    if line.strip().startswith(("cvae ", "torchrun "))]
        assert examples, f"cvae {name} --help shows no example"
        for example in examples:
            words = shlex.split(example)
            words = words[words.index(name) + 1:]  # after `cvae NAME` or `torchrun ... -m cvae_cli NAME`
            with command.make_context(name, words, resilient_parsing=False) as ctx:
                assert ctx.params is not None, example


def test_selection_sampling_and_logvar(tmp_path, weights):
    make_video(tmp_path / "v.mp4", frames=13, width=94, height=70)
    r = cvae("encode", tmp_path / "v.mp4", "-o", tmp_path / "z.safetensors", "-w", weights,
             "--frames", "2:9", "--size", "48x32", "--sample", "--seed", "3", "--save-logvar")
    assert r.exit_code == 0, r.output
    latent = LatentFile.open(tmp_path / "z.safetensors")
    assert (latent.meta.frames, latent.meta.width, latent.meta.height) == (7, 48, 32)
    assert latent.shape == (4, 3, 4, 6) and latent.has_logvar and latent.meta.sampled
    again = tmp_path / "again.safetensors"
    assert cvae("encode", tmp_path / "v.mp4", "-o", again, "-w", weights, "--frames", "2:9", "--size", "48x32",
                "--sample", "--seed", "3").exit_code == 0
    assert torch.equal(LatentFile.open(again).read(), latent.read())  # same seed, same sample
    r = cvae("info", tmp_path / "z.safetensors")
    assert r.exit_code == 0 and "(4, 3, 4, 6)" in r.output and "frames: 7" in r.output


@pytest.mark.parametrize("args, message", [
    (["--frames", "5"], "expected A:B"),
    (["--size", "big"], "expected WxH"),
    (["--chunk", "6"], "multiple of 4"),
    (["--dtype", "int8"], "use auto"),
    (["--frames", "50:"], "no frames selected"),
])
def test_bad_options_are_one_line_errors(tmp_path, weights, args, message):
    make_video(tmp_path / "v.mp4", frames=5)
    assert_one_line_error(cvae("encode", tmp_path / "v.mp4", "-w", weights, "--device", "cpu", *args), message)
    assert not (tmp_path / "v.safetensors").exists()


def test_bad_weights_are_one_line_errors(tmp_path, weights):
    media.write_image(tmp_path / "img.png", np.zeros((16, 16, 3), np.uint8))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:5000])
    assert_one_line_error(cvae("encode", tmp_path / "img.png", "-w", cut), "cut.safetensors")
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"encoder_attention": "AttnBlockXL"}))
    save_file({"x": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    assert_one_line_error(cvae("encode", tmp_path / "img.png", "-w", folder), "unknown block 'AttnBlockXL'")
    assert not (tmp_path / "img.safetensors").exists()


def test_unexpected_failures_are_one_line_too(tmp_path, weights, monkeypatch):
    media.write_image(tmp_path / "img.png", np.zeros((16, 16, 3), np.uint8))
    monkeypatch.setattr("cvae_cli.convert.encode_files", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom\nmore")))
    r = cvae("encode", tmp_path / "img.png", "-w", weights)
    assert_one_line_error(r, "RuntimeError: boom", "CVAE_DEBUG")
    assert r.exit_code == 2
    r = cvae("encode", tmp_path / "img.png", "-w", weights, "--no-such-option")
    assert r.exit_code == 2 and "No such option" in r.output
    r = cvae("encode", tmp_path / "img.png", "-w", weights, "--batch-size", "0")
    assert r.exit_code == 2 and "--batch-size" in r.output and "greater than" in r.output


# --- what a new user met ------------------------------------------------------------------------

def test_decode_after_encode_leaves_the_source_video_alone(tmp_path, weights):
    video = make_video(tmp_path / "clip.mp4", frames=5)
    before = video.read_bytes()
    assert cvae("encode", video, "-w", weights).exit_code == 0
    r = cvae("decode", tmp_path / "clip.safetensors", "-w", weights)
    assert r.exit_code == 0, r.output
    assert video.read_bytes() == before and media.probe(tmp_path / "clip.decoded.mp4").frame_count == 5
    assert cvae("decode", tmp_path / "clip.safetensors", "-w", weights, "--overwrite").exit_code == 0
    assert video.read_bytes() == before


def test_no_command_writes_over_its_own_input(tmp_path, weights):
    video = make_video(tmp_path / "v.mp4", frames=5)
    before = video.read_bytes()
    for args in (["reconstruct", video, "-o", video], ["reconstruct", video, "-o", tmp_path / "." / "v.mp4"]):
        assert_one_line_error(cvae(*args, "-w", weights, "--overwrite"), "is an input of this command")
    assert cvae("encode", video, "-w", weights).exit_code == 0
    z = tmp_path / "v.safetensors"
    latent = z.read_bytes()
    assert_one_line_error(cvae("encode", z, "-o", z, "-w", weights, "--overwrite"), "is an input of this command")
    assert video.read_bytes() == before and z.read_bytes() == latent
    # decode: an input it cannot read as a latent is still an input, never written over
    named = tmp_path / "v.decoded.mp4"  # what z decodes to by default
    named.write_bytes(before)
    for args in ([z, named], [z, video, "-o", video]):
        r = cvae("decode", *args, "-w", weights, "--overwrite")
        assert r.exit_code == 1 and "wrote" not in r.output, r.output
        assert r.output.splitlines()[-1].startswith("error:") and "Traceback" not in r.output
    assert "v.decoded.mp4 is an input of this command" in cvae("decode", z, named, "-w", weights).output
    assert named.read_bytes() == before and video.read_bytes() == before


def test_two_inputs_on_one_output_are_refused_before_any_work(tmp_path, weights):
    media.write_image(tmp_path / "a.jpg", np.zeros((16, 16, 3), np.uint8))
    media.write_image(tmp_path / "a.png", np.zeros((16, 16, 3), np.uint8))
    r = cvae("encode", tmp_path / "a.*", "--out-dir", tmp_path / "out", "-w", weights)
    assert_one_line_error(r, "a.jpg and", "a.png would both write", "a.safetensors")
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        media.write_image(tmp_path / folder / "b.jpg", np.zeros((16, 16, 3), np.uint8))
    r = cvae("encode", tmp_path / "x" / "b.jpg", tmp_path / "y" / "b.jpg", "--out-dir", tmp_path / "out", "-w", weights)
    assert_one_line_error(r, "would both write", "--manifest")
    assert not (tmp_path / "out").exists()


def test_one_file_named_twice_is_one_job(tmp_path, weights):
    # two spellings of one file: one output, written once (batched, two writers of one output
    # removed each other's temporary files and the run failed)
    media.write_image(tmp_path / "a.png", np.zeros((16, 16, 3), np.uint8))
    r = cvae("encode", tmp_path / "a.png", tmp_path / "." / "a.png", "-b", "2", "-w", weights)
    assert r.exit_code == 0, r.output
    assert r.output.count("wrote ") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.safetensors"]


@pytest.mark.parametrize("command, output, message", [
    ("encode", "photo.mp4", "latents are written as .safetensors, not .mp4"),
    ("decode", "out.avi", "cannot write a video named .avi (use .mp4, .mov, .mkv, .webm)"),
    ("decode", "out.png", "cannot write a video named .png"),  # a video's latent decodes to a video
])
def test_an_output_suffix_that_lies_is_refused(tmp_path, weights, command, output, message):
    src = make_video(tmp_path / "v.mp4", frames=5)
    if command == "decode":
        assert cvae("encode", src, "-w", weights).exit_code == 0
        src = tmp_path / "v.safetensors"
    assert_one_line_error(cvae(command, src, "-o", tmp_path / output, "-w", weights), message)
    assert not (tmp_path / output).exists()


def test_webm_holds_vp9_and_keeps_an_odd_size_exactly(tmp_path, weights):
    with media.VideoWriter(tmp_path / "odd.mp4", 24, 33, 17) as source:  # 33x17, as cvae itself writes it
        for i in range(5):
            source.write(np.full((17, 33, 3), 40 * i, np.uint8))
    assert cvae("encode", tmp_path / "odd.mp4", "-w", weights).exit_code == 0
    r = cvae("decode", tmp_path / "odd.safetensors", "-o", tmp_path / "odd.webm", "-w", weights)
    assert r.exit_code == 0, r.output
    with av.open(str(tmp_path / "odd.webm")) as c:  # as any player sees it
        s = c.streams.video[0]
        assert "webm" in c.format.name and s.codec_context.name == "vp9" and (s.width, s.height) == (33, 17)
        assert sum(1 for _ in c.decode(s)) == 5
    assert cvae("decode", tmp_path / "odd.safetensors", "-w", weights).exit_code == 0
    with av.open(str(tmp_path / "odd.decoded.mp4")) as c:  # H.264 4:2:0: one repeated column and row
        assert (c.streams.video[0].width, c.streams.video[0].height) == (34, 18)
    assert (media.probe(tmp_path / "odd.decoded.mp4").width, media.probe(tmp_path / "odd.decoded.mp4").height) == (33, 17)


def test_a_one_frame_video_decodes_to_a_one_frame_video(tmp_path, weights):
    make_video(tmp_path / "one.mp4", frames=1)
    assert cvae("encode", tmp_path / "one.mp4", "-w", weights).exit_code == 0
    assert cvae("decode", tmp_path / "one.safetensors", "-w", weights).exit_code == 0
    info = media.probe(tmp_path / "one.decoded.mp4")
    assert not info.is_image and info.frame_count == 1


def test_latents_that_lie_or_hold_nan_are_refused(tmp_path, weights):
    make_video(tmp_path / "v.mp4", frames=9)
    assert cvae("encode", tmp_path / "v.mp4", "-w", weights).exit_code == 0
    good = LatentFile.open(tmp_path / "v.safetensors")
    meta, latent = good.meta, good.read()
    save_file({"latent": latent[:, :2].contiguous()}, str(tmp_path / "short.safetensors"), metadata=meta.to_metadata())
    assert_one_line_error(cvae("decode", tmp_path / "short.safetensors", "-w", weights), "but its metadata (9 frames")
    latent[0, 1, 2, 3] = float("nan")
    save_file({"latent": latent}, str(tmp_path / "nan.safetensors"), metadata=meta.to_metadata())
    assert_one_line_error(cvae("decode", tmp_path / "nan.safetensors", "-w", weights), "NaN or infinite")
    assert not list(tmp_path.glob("*.decoded.*")) and not list(tmp_path.glob(".*"))


def test_force_never_decodes_latents_of_another_architecture(tmp_path, weights):
    shallow = random_model(seed=2, norm="frame", encoder_spatial_downsample=("SpatialDownsample2x", "", "", ""),
                           decoder_spatial_upsample=("", "", "", "SpatialUpsample2x"))
    other = save_model(shallow, tmp_path / "shallow.safetensors")
    make_video(tmp_path / "v.mp4", frames=5)
    assert cvae("encode", tmp_path / "v.mp4", "-w", weights).exit_code == 0
    r = cvae("decode", tmp_path / "v.safetensors", "-w", other, "--force")
    assert_one_line_error(r, "another architecture (space compression 8, not 2)", "--force cannot decode it")
    assert not (tmp_path / "v.decoded.mp4").exists()


def test_version_info_on_media_and_help_without_bool_placeholders(tmp_path):
    r = cvae("--version")
    assert r.exit_code == 0 and r.output.startswith("cvae ")
    make_video(tmp_path / "v.mp4", frames=7, width=94, height=70)
    r = cvae("info", tmp_path / "v.mp4")
    assert r.exit_code == 0 and "Unpickl" not in r.output
    assert f"{tmp_path / 'v.mp4'}: video, 94x70, h264" in r.output and "frames: 7" in r.output and "fps: 24" in r.output
    media.write_image(tmp_path / "p.jpg", np.zeros((20, 30, 3), np.uint8))
    assert f"{tmp_path / 'p.jpg'}: image, 30x20, JPEG" in cvae("info", tmp_path / "p.jpg").output
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(cvae("info", tmp_path / "notes.txt"), "describes videos, images, latents and weights")
    for command in ("encode", "decode", "reconstruct", "inflate"):
        help_text = cvae(command, "--help").output
        assert "<bool>" not in help_text and "--quiet" in help_text


def test_dry_run_lists_the_jobs_and_notices_a_missing_file(tmp_path, weights):
    make_video(tmp_path / "a.mp4", frames=5)
    r = cvae("encode", tmp_path / "a.mp4", tmp_path / "gone.mp4", "--out-dir", tmp_path / "z", "--dry-run", "-w", weights)
    assert r.exit_code == 1
    assert f"{tmp_path / 'a.mp4'} -> {tmp_path / 'z' / 'a.safetensors'}" in r.output
    assert f"error: no such file: {tmp_path / 'gone.mp4'}" in r.output and not (tmp_path / "z").exists()


def test_a_later_run_removes_what_a_killed_one_left_and_outputs_are_readable_by_others(tmp_path, weights):
    from cvae_cli.atomic import FILE_MODE

    make_video(tmp_path / "v.mp4", frames=5)
    left = [tmp_path / ".v.safetensors.x1y2.latent.raw", tmp_path / ".v.safetensors.q9.part.safetensors"]
    for p in left:
        p.write_bytes(b"half")
    assert cvae("encode", tmp_path / "v.mp4", "-w", weights).exit_code == 0
    assert not any(p.exists() for p in left)
    assert (tmp_path / "v.safetensors").stat().st_mode & 0o777 == FILE_MODE


def test_progress_in_a_log_is_a_line_every_few_seconds_of_frames_through_the_model(tmp_path, weights, monkeypatch):
    from cvae_cli.cli.output import Output

    monkeypatch.setattr(Output, "every_s", 0.0)  # a line at every step
    make_video(tmp_path / "v.mp4", frames=13)
    r = cvae("encode", tmp_path / "v.mp4", "-w", weights, "--chunk", "4")
    assert r.exit_code == 0, r.output
    counts = [line.split(": ")[1].split(" frames")[0] for line in r.output.splitlines() if " left" in line]
    # frames become latents 1 + 4 at a time: 5, 9, 13, never all 13 read up front
    assert counts == ["5/13", "9/13", "13/13"], r.output


def test_progress_on_a_terminal_shows_rate_and_time_left_from_the_first_chunk():
    """A CPU chunk can take longer than rich's 30-s speed window, and rich's own estimate needs two
    updates inside it: the bar must still show frames/s and the time left after one chunk."""
    from rich.progress import Progress

    from cvae_cli.cli.output import BAR_COLUMNS

    now = [0.0]
    bar = Progress(*BAR_COLUMNS(), get_time=lambda: now[0], auto_refresh=False, disable=True)
    task = bar.add_task("encoding v.mp4", total=250)
    now[0] = 40.0  # the first chunk, through the model, took 40 s
    bar.advance(task, 17)
    now[0] = 80.0
    bar.advance(task, 16)
    shown = " ".join(str(column.render(bar.tasks[0])) for column in BAR_COLUMNS()[2:])
    assert shown.split() == ["33/250", f"{80 / 33:.1f}", "s/frame", f"0:08:{(217 * 80 // 33) % 60:02d}"]


def test_auto_mode_windows_a_clip_norm_model_and_stream_warns(tmp_path):
    clip_norm = save_model(random_model(), tmp_path / "clip.safetensors")  # the released layout
    make_video(tmp_path / "v.mp4", frames=9, width=32, height=24)
    assert cvae("encode", tmp_path / "v.mp4", "-w", clip_norm, "-o", tmp_path / "auto.safetensors").exit_code == 0
    assert cvae("encode", tmp_path / "v.mp4", "-w", clip_norm, "-o", tmp_path / "window.safetensors",
                "--mode", "window").exit_code == 0
    assert torch.equal(LatentFile.open(tmp_path / "auto.safetensors").read(),
                       LatentFile.open(tmp_path / "window.safetensors").read())
    r = cvae("encode", tmp_path / "v.mp4", "-w", clip_norm, "-o", tmp_path / "s.safetensors", "--mode", "stream")
    assert r.exit_code == 0
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "only approximates this model" in warnings[0]


def test_a_sample_does_not_depend_on_the_chunk(tmp_path, weights):
    make_video(tmp_path / "v.mp4", frames=17)
    for chunk in ("4", "8", "16"):
        assert cvae("encode", tmp_path / "v.mp4", "-o", tmp_path / f"s{chunk}.safetensors", "-w", weights,
                    "--sample", "--seed", "7", "--chunk", chunk).exit_code == 0
    samples = [LatentFile.open(tmp_path / f"s{c}.safetensors").read() for c in ("4", "8", "16")]
    assert rel_err(samples[1], samples[0]) < 1e-5 and rel_err(samples[2], samples[0]) < 1e-5
    assert cvae("encode", tmp_path / "v.mp4", "-o", tmp_path / "mean.safetensors", "-w", weights).exit_code == 0
    assert rel_err(samples[0], LatentFile.open(tmp_path / "mean.safetensors").read()) > 1e-3  # it is a sample


def test_options_that_would_be_ignored_are_refused(tmp_path, weights):
    """--seed without --sample, and --size with --max-side, used to be dropped silently."""
    make_video(tmp_path / "v.mp4", frames=5)
    assert_one_line_error(cvae("encode", tmp_path / "v.mp4", "-w", weights, "--seed", "7"),
                          "--seed is the seed of --sample")
    for command in ("encode", "reconstruct"):
        assert_one_line_error(cvae(command, tmp_path / "v.mp4", "-w", weights, "--size", "32x32", "--max-side", "16"),
                              "--size and --max-side both set the size")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_latents_encoded_with_another_norm_decode_with_it(tmp_path):
    """`encode --norm frame` of clip-norm weights records the norm; decode runs the weights with it
    unless told otherwise (it used to refuse them as made by other weights)."""
    clip_norm = save_model(random_model(encoder_attention="AttnBlock3DFix", decoder_attention="AttnBlock3DFix"),
                           tmp_path / "clip.safetensors")
    make_video(tmp_path / "v.mp4", frames=5, width=32, height=24)
    assert cvae("encode", tmp_path / "v.mp4", "-w", clip_norm, "--norm", "frame", "-o", tmp_path / "z.safetensors",
                "--chunk", "4").exit_code == 0
    r = cvae("decode", tmp_path / "z.safetensors", "-w", clip_norm, "-o", tmp_path / "auto.mp4")
    assert r.exit_code == 0, r.output
    assert cvae("decode", tmp_path / "z.safetensors", "-w", clip_norm, "--norm", "frame",
                "-o", tmp_path / "told.mp4").exit_code == 0
    assert (tmp_path / "auto.mp4").read_bytes() == (tmp_path / "told.mp4").read_bytes()
    assert_one_line_error(cvae("decode", tmp_path / "z.safetensors", "-w", clip_norm, "--norm", "clip",
                               "-o", tmp_path / "clip.mp4"), "decode it with --norm frame")


@pytest.mark.parametrize("entry", [["-m", "cvae_cli"], ["-m", "cvae_cli.cli"]])
def test_every_way_of_running_the_cli_lists_every_command(entry):
    """`python -m cvae_cli.cli` once listed neither train nor plot (its __main__ guard sat mid-file)."""
    r = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    listed = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert {"inflate", "info", "encode", "decode", "reconstruct", "train", "plot"} <= listed


# --- issue 21: real media, values that mean nothing, work never thrown away --------------------

def real_photo(tmp_path: Path, name: str = "coffee.png", size: tuple[int, int] | None = (48, 32)) -> Path:
    """scikit-image's bundled photo (real pixels nobody here made), small so the tiny model is quick."""
    skimage = pytest.importorskip("skimage")
    from PIL import Image

    photo = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
    if size:
        photo = photo.resize(size, Image.LANCZOS)
    photo.save(tmp_path / "photo.png")
    return tmp_path / "photo.png"


@pytest.mark.parametrize("args, message", [
    (["--frames", "10:5"], "no frames selected"), (["--frames", "0:0"], "no frames selected"),
    (["--frames", "-5:"], "count from 0"), (["--fps", "0"], "above 0"), (["--fps", "-1"], "above 0"),
    (["--size", "0x0"], "at least 1 pixel"), (["--max-side", "-5"], "at least 1 pixel"),
    (["--max-side", "0"], "at least 1 pixel"), (["--crf", "99"], "H.264 (.mp4, .mov, .mkv) takes 0 (lossless) to 51"),
    (["--crf", "-1"], "takes 0"), (["--dtype", "float17"], "--dtype float17"),
])
def test_values_that_mean_nothing_are_refused_in_one_line_even_when_the_output_exists(tmp_path, weights, args, message):
    """Checked before the output is looked at: an existing output used to make these a silent skip."""
    (tmp_path / "clip.recon.mp4").write_bytes(b"an earlier run")
    r = cvae("reconstruct", REPO / "examples" / "cockatoo.mp4", "-o", tmp_path / "clip.recon.mp4", "-w", weights, *args)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert (tmp_path / "clip.recon.mp4").read_bytes() == b"an earlier run"


def test_crf_follows_the_codec_of_the_output(tmp_path, weights):
    r = cvae("decode", tmp_path / "z.safetensors", "-o", tmp_path / "a.webm", "--crf", "64", "-w", weights)
    assert r.exit_code == 1 and "VP9 (.webm) takes 0 (lossless) to 63" in r.output
    r = cvae("decode", tmp_path / "z.safetensors", "-o", tmp_path / "a.webm", "--crf", "60", "-w", weights)
    assert "--crf" not in r.output and "no such file" in r.output  # 60 is within VP9's scale


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_without_cuda_is_refused_even_when_the_output_exists(tmp_path, weights):
    (tmp_path / "clip.safetensors").write_bytes(b"an earlier run")
    r = cvae("encode", REPO / "examples" / "cockatoo.mp4", "-o", tmp_path / "clip.safetensors", "--device", "cuda")
    assert r.exit_code == 1 and "no CUDA GPU" in r.output and "skip" not in r.output


def test_fp16_on_the_cpu_warns_and_fast_on_the_cpu_is_off_with_no_recompile_noise(tmp_path, weights):
    photo = real_photo(tmp_path)
    r = cvae("reconstruct", photo, "-w", weights, "--dtype", "float16", "--device", "cpu", "--dry-run")
    assert "about 20x slower" in r.output
    r = cvae("reconstruct", photo, "-o", tmp_path / "fast.png", "-w", weights, "--fast", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "--fast does nothing on the CPU" in r.output and "recompil" not in r.output.lower() and "dynamo" not in r.output


def test_an_empty_selection_of_a_real_clip_is_refused_with_no_output_and_no_nan(tmp_path, weights):
    """`--frames 100:200` of the 41-frame example clip selects nothing: one line, exit 1, no file
    (it printed `PSNR nan dB`, `wrote ... (0 frames)`, exit 0, and `"psnr": NaN` in the JSON)."""
    r = cvae("reconstruct", REPO / "examples" / "cockatoo.mp4", "-o", tmp_path / "out.mp4", "-w", weights,
             "--frames", "100:200", "--size", "32x32", "--metrics-json", tmp_path / "m.json")
    assert r.exit_code == 1 and "no frames selected" in r.output and "nan" not in r.output.lower(), r.output
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "m.json").exists()


def test_a_tiny_real_image_reconstructs_with_psnr_and_no_ssim(tmp_path, weights):
    """Images under 11 px encode and decode; SSIM's window does not fit them, so it is left out."""
    photo = real_photo(tmp_path, size=(10, 7))
    r = cvae("reconstruct", photo, "-o", tmp_path / "out.png", "-w", weights, "--metrics-json", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    assert "SSIM n/a" in r.output and media.probe(tmp_path / "out.png").width == 10
    scores = json.loads((tmp_path / "m.json").read_text())[str(photo)]
    assert scores["frames"] == 1 and scores["ssim"] is None and 0 < scores["psnr"] < 60


def test_psnr_says_it_scores_frames_before_the_video_encoder(tmp_path, weights):
    r = cvae("reconstruct", REPO / "examples" / "cockatoo.mp4", "-o", tmp_path / "out.mp4", "-w", weights,
             "--frames", "0:5", "--size", "32x32")
    assert r.exit_code == 0 and "before H.264 encoding" in r.output, r.output


def test_scoring_that_fails_keeps_the_written_output(tmp_path, weights, monkeypatch):
    """The output is written first; a scoring failure (here: made to run out of memory) is a warning."""
    def out_of_memory(*_):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 26902481760 bytes")

    monkeypatch.setattr(convert.FrameMetrics, "add", out_of_memory)
    photo = real_photo(tmp_path)
    r = cvae("reconstruct", photo, "-o", tmp_path / "out.png", "-w", weights, "--metrics-json", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    assert "no scores (DefaultCPUAllocator" in r.output and "the output was written" in r.output
    assert media.probe(tmp_path / "out.png").width == 48


def test_no_metrics_writes_the_reconstruction_only(tmp_path, weights, monkeypatch):
    monkeypatch.setattr(convert.FrameMetrics, "add", lambda *_: pytest.fail("scored with --no-metrics"))
    photo = real_photo(tmp_path)
    r = cvae("reconstruct", photo, "-o", tmp_path / "out.png", "-w", weights, "--no-metrics")
    assert r.exit_code == 0 and "PSNR" not in r.output and (tmp_path / "out.png").exists(), r.output
    r = cvae("reconstruct", photo, "-w", weights, "--no-metrics", "--metrics-json", tmp_path / "m.json")
    assert r.exit_code == 1 and "choose one" in r.output


def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, weights):
    photo = real_photo(tmp_path)
    (tmp_path / "blocker").write_text("a file, not a folder")
    r = cvae("reconstruct", photo, "-o", tmp_path / "blocker" / "out.png", "-w", weights)
    assert r.exit_code == 1 and "is not a folder" in r.output and "PSNR" not in r.output, r.output


def test_check_writable_finds_read_only_and_full_folders(tmp_path, monkeypatch):
    from cvae_cli import outputs
    from cvae_cli.errors import CvaeError

    outputs.check_writable(tmp_path / "new" / "deeper" / "x.png")  # folders to be made: their parent decides
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        probe = ro / "probe"
        try:
            probe.write_text("")
            probe.unlink()
            writable_anyway = True  # root ignores the mode bits
        except OSError:
            writable_anyway = False
        if not writable_anyway:
            with pytest.raises(CvaeError, match="is not writable"):
                outputs.check_writable(ro / "x.png")
    finally:
        ro.chmod(0o755)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda _: type("U", (), {"free": 4096})())
    with pytest.raises(CvaeError, match="is full"):
        outputs.check_writable(tmp_path / "x.png")


def test_a_glob_run_again_leaves_out_its_own_outputs(tmp_path, weights, monkeypatch):
    """`cvae reconstruct '*.png'` twice: the second run must not take photo.recon.png as an input."""
    real_photo(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cvae("reconstruct", "*.png", "-w", weights, "--no-metrics").exit_code == 0
    assert (tmp_path / "photo.recon.png").exists()
    r = cvae("reconstruct", "*.png", "-w", weights, "--no-metrics")
    assert r.exit_code == 0 and "skip photo.recon.png exists" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "photo.recon.png"]
    r = cvae("reconstruct", "*.recon.png", "-w", weights)
    assert r.exit_code == 1 and "no file matches *.recon.png but cvae's own outputs" in r.output


def test_info_goes_on_past_a_bad_file(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    r = cvae("info", tmp_path / "missing.mp4", tmp_path / "bad.mp4", REPO / "examples" / "cockatoo.mp4")
    assert r.exit_code == 1
    assert "no such file" in r.output and "bad.mp4" in r.output and "cockatoo.mp4: video, 456x256" in r.output


def test_dry_run_prints_its_plan_on_stdout(tmp_path):
    """As `encode --manifest --dry-run` does: the plan is the command's output, messages go to stderr."""
    photo = real_photo(tmp_path)
    done = subprocess.run([sys.executable, "-m", "cvae_cli", "reconstruct", str(photo), "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{photo} -> {tmp_path / 'photo.recon.png'}" and "->" not in done.stderr


def test_log_lines_give_the_time_left(capsys):
    from cvae_cli.cli.output import Output

    out = Output()
    out.every_s = 0
    with out.progress("reconstructing x.mp4", 40) as advance:
        advance(10)
    line = capsys.readouterr().err
    assert "reconstructing x.mp4: 10/40 frames" in line and " left" in line


def test_a_photos_log_line_shows_the_part_of_a_frame_done_and_seconds_per_frame(capsys, monkeypatch):
    from cvae_cli.cli import output

    now = [0.0]
    monkeypatch.setattr(output.time, "monotonic", lambda: now[0])
    out = output.Output()
    out.every_s = 0
    with out.progress("reconstructing big.png", 1) as advance:
        now[0] = 60.0
        advance(0.25)  # a quarter of the photo's tiles in a minute
    line = capsys.readouterr().err
    assert "reconstructing big.png: 0.2/1 frames, 240 s/frame, 0:03:00 left" in line, line
