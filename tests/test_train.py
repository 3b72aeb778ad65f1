"""`cvae train` as a researcher uses it: it learns, it resumes exactly, it splits across processes,
it freezes what it is told to, it makes SD-layout image VAEs, and bad input is one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cvae_cli import media, trainset
from cvae_cli.checkpoints import load_model, provenance, read_state_dict
from cvae_cli.cli import app
from cvae_cli.errors import CvaeError
from cvae_cli.metrics import psnr
from cvae_cli.model import CausalVAE
from cvae_cli.train import Start, TrainOptions, Trainer, from_flat, read_config, read_rows, to_uint8, train
from conftest import cvae_process, wait_for

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "examples" / "cockatoo.mp4"  # real footage (a held-out source), 41 frames, 456x256
PHOTO = REPO / "examples" / "coffee.jpg"
TINY = {"base": "v1.0.0", "hidden_size": 32, "hidden_size_mult": [1, 1, 1, 1], "num_res_blocks": 1,
        "norm": "frame", "encoder_attention": "AttnBlock3DFix", "decoder_attention": "AttnBlock3DFix"}
runner = CliRunner()


def cvae(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory) -> Path:
    """9 real frames scaled to 48x32: a crop of 32 sees the whole picture, so a tiny model can learn it."""
    path = tmp_path_factory.mktemp("media") / "small.mp4"
    frames = list(media.read_frames(CLIP, start=0, end=9, size=(48, 32)))
    with media.VideoWriter(path, 20, 48, 32, crf=0) as w:
        for f in frames:
            w.write(f)
    return path


def options(out: Path, data, **kw) -> TrainOptions:
    base = dict(out=out, data=[str(d) for d in data], steps=6, batch_size=2, frames=5, size=32, lr=2e-3, warmup=2,
                save_every=2, log_every=1, val_every=3, workers=0)
    base.update(kw)
    return from_flat(TrainOptions, base)


def losses_of(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["l1"], r["kl"]) for r in read_rows(run / "loss.csv")]


def test_tiny_model_overfits_a_real_clip(tmp_path, tiny, small_clip):
    opts = options(tmp_path / "run", [small_clip], val=[str(small_clip)], steps=60, val_every=60, log_every=10,
                   lr=3e-3, warmup=5, save_every=60)
    final = train(opts, Start(config=str(tiny)))
    rows = read_rows(tmp_path / "run" / "loss.csv")
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < 0.85 * first, (first, last)  # measured: 0.78 (0.294 -> 0.228)
    # PSNR of the clip before training (same seeded init) and after, as the run measured it
    torch.manual_seed(0)
    start = CausalVAE(read_config(str(tiny))).eval()
    (_, x), = trainset.validation_set(trainset.survey([small_clip], 32), 5, 32)
    with torch.no_grad():
        before = psnr(to_uint8(x), to_uint8(start(x[None])[0])).mean().item()
    after = float(rows[-1]["val_psnr"])
    assert after > before + 5, (before, after)  # measured: 17.2 dB after 60 steps
    model = load_model(final)  # an ordinary weights file, with its provenance
    assert provenance(model)["trained_steps"] == "60" and provenance(model)["train_start"] == f"config {tiny}"


class Interrupt(Exception):
    pass


def test_killed_run_resumes_to_the_same_losses_and_weights(tmp_path, tiny):
    data = [CLIP, PHOTO]
    kw = dict(image_ratio=0.3, photo_motion=0.5, ema=0.9, steps=7, save_every=3)
    whole = train(options(tmp_path / "whole", data, **kw), Start(config=str(tiny)))

    def stop_at(step, total):
        if step == 5:  # after the checkpoint at 3: steps 4 and 5 are lost, as in a kill
            raise Interrupt

    from cvae_cli.train import Report
    with pytest.raises(Interrupt):
        train(options(tmp_path / "cut", data, **kw), Start(config=str(tiny)), report=Report(advance=stop_at))
    assert [r[0] for r in losses_of(tmp_path / "cut")] == ["1", "2", "3", "4"]
    resumed = train(options(tmp_path / "cut", data, **kw), Start(config=str(tiny)))
    assert losses_of(tmp_path / "cut") == losses_of(tmp_path / "whole")
    a, b = load_file(whole), load_file(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_signal_saves_the_step_it_stops_on_and_the_run_resumes_from_there(tmp_path, tiny):
    """Ctrl-C or SIGTERM (a preempted job) between checkpoints loses no step: the handler only asks
    (`interrupt.request`), the trainer saves at the step it is on, says so, and ends non-zero."""
    from cvae_cli import interrupt
    from cvae_cli.train import Report

    kw = dict(steps=6, save_every=5)
    whole = train(options(tmp_path / "whole", [CLIP, PHOTO], **kw), Start(config=str(tiny)))
    notes = []

    def preempt(step, total):
        if step == 3:
            interrupt.request("interrupted (SIGTERM)", 143)

    try:
        with pytest.raises(interrupt.Interrupted) as stop:
            train(options(tmp_path / "cut", [CLIP, PHOTO], **kw), Start(config=str(tiny)),
                  report=Report(note=notes.append, advance=preempt))
    finally:
        interrupt.clear()
    assert stop.value.status == 143
    assert stop.value.outcome == (f"stopped at step 3, saved in {tmp_path / 'cut' / 'checkpoint.pt'}: "
                                  "run the same command again to resume")
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 3
    resumed = train(options(tmp_path / "cut", [CLIP, PHOTO], **kw), Start(config=str(tiny)))
    assert losses_of(tmp_path / "cut") == losses_of(tmp_path / "whole")
    a, b = load_file(whole), load_file(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_asked_before_a_step_runs_no_step(tmp_path, tiny):
    """Ctrl-C while a batch loads (minutes, for large clips) stops before computing it."""
    from cvae_cli import interrupt
    from cvae_cli.train import Report

    try:
        with pytest.raises(interrupt.Interrupted) as stop:
            train(options(tmp_path / "run", [PHOTO], frames=1, steps=4), Start(config=str(tiny)),
                  report=Report(begin=lambda step, total: interrupt.request("interrupted (SIGINT)", 130)))
    finally:
        interrupt.clear()
    assert stop.value.outcome == "stopped at step 0, before training on: nothing new to save"
    assert read_rows(tmp_path / "run" / "loss.csv") == [] and not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_a_signal_to_the_whole_job_stops_it_at_a_step_with_data_workers_running(tmp_path, tiny):
    """A terminal's Ctrl-C, `timeout` and batch schedulers signal every process of the job, the
    DataLoader workers too. A worker killed by it used to end the run with a DataLoader error and
    no checkpoint; the workers now leave the stop to the trainer."""
    run = tmp_path / "run"
    cmd, env = cvae_process("train", "--config", tiny, "--data", CLIP, "--data", PHOTO, "--frames", 5, "--size", 32,
                            "--steps", 100000, "--save-every", 100000, "--log-every", 1, "--workers", 2,
                            "--out", run)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: (run / "loss.csv").exists() and len(read_rows(run / "loss.csv")) >= 2 or proc.poll() is not None,
                 "two training steps")
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output
    assert "DataLoader" not in output and "Traceback" not in output
    step = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    # one line, which says what was kept (it used to add "no partial output was kept" below it)
    assert output.splitlines()[-1] == (f"error: interrupted (SIGTERM): stopped at step {step}, saved in "
                                       f"{run / 'checkpoint.pt'}: run the same command again to resume"), output
    assert "no partial output" not in output


def test_resume_refuses_changed_settings(tmp_path, tiny):
    train(options(tmp_path / "run", [PHOTO], frames=1, steps=2), Start(config=str(tiny)))
    with pytest.raises(CvaeError, match="batch_size 2, not 4"):
        Trainer(options(tmp_path / "run", [PHOTO], frames=1, steps=4, batch_size=4), Start(config=str(tiny))).prepare()


def test_train_temporal_leaves_every_other_weight_bit_identical(tmp_path, tiny):
    start = Start(config=str(tiny))
    final = train(options(tmp_path / "run", [CLIP], train="temporal", steps=3), start)
    torch.manual_seed(0)
    before = start.build().state_dict()
    after = read_state_dict(final)
    model = CausalVAE(read_config(str(tiny)))
    from cvae_cli.train import select_trainable
    temporal = {id(p) for p in select_trainable(model, "temporal")}
    names = {n for n, p in model.named_parameters() if id(p) in temporal}
    assert names and all(".conv.weight" in n or ".conv.bias" in n for n in names)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= names
    assert not any(k.startswith("encoder.down.0.block.0.norm") for k in changed)


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, tiny):
    common = ["train", "--config", tiny, "--data", CLIP, "--data", PHOTO, "--steps", "3", "--frames", "5",
              "--size", "32", "--lr", "2e-3", "--warmup", "1", "--photo-motion", "0.5", "--workers", "0",
              "--log-every", "1", "-q"]
    one = subprocess.run([sys.executable, "-m", "cvae_cli", *map(str, common), "-b", "4", "--out", tmp_path / "one"],
                         capture_output=True, text=True, cwd=REPO)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cvae_cli", *map(str, common), "-b", "2", "--out", tmp_path / "two"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr
    la, lb = losses_of(tmp_path / "one"), losses_of(tmp_path / "two")  # terms are averaged over ranks
    assert [r[0] for r in la] == [r[0] for r in lb] == ["1", "2", "3"]
    for x, y in zip(la, lb):  # measured: loss and L1 agree to 6e-6, KL to 3e-4 (relative)
        assert abs(float(x[1]) - float(y[1])) <= 5e-5 * float(x[1]) and abs(float(x[2]) - float(y[2])) <= 5e-5 * float(x[2])
        assert abs(float(x[3]) - float(y[3])) <= 2e-3 * float(x[3])
    a, b = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "two" / "final.safetensors")
    flat_a, flat_b = (torch.cat([t[k].flatten() for k in sorted(a)]) for t in (a, b))
    # Reduction order differs (all-reduce of two half-batch means); Adam magnifies that only in biases
    # that a following GroupNorm makes gradient-free: the weights as a whole agree to 1.2e-4 (measured).
    assert ((flat_a - flat_b).norm() / flat_a.norm()).item() < 1e-3


def test_image_model_in_sd_layout_inflates_to_itself_frame_by_frame(tmp_path, tiny):
    diffusers = pytest.importorskip("diffusers")
    config = tmp_path / "image.json"
    config.write_text(json.dumps({"base": "image", "hidden_size": 32, "hidden_size_mult": [1, 2, 2, 2]}))
    run = tmp_path / "image"
    train(options(run, [PHOTO, CLIP], frames=1, steps=2), Start(config=str(config)))
    image = load_model(run / "final.safetensors")
    sd = load_file(run / "final-sd-vae.safetensors")
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                  block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_num_groups=32,
                                  latent_channels=4).eval()
    vae.load_state_dict(sd, strict=True)  # diffusers' own names, every tensor
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).latent_dist.mode()).sample
        assert torch.allclose(image(x[:, :, None])[:, :, 0], ref, atol=1e-4)
    r = cvae("inflate", "--from", run / "final-sd-vae.safetensors", "--init", "tail", "-o", tmp_path / "v.safetensors")
    assert r.exit_code == 0, r.output
    from cvae_cli.inflate import inflate
    video = inflate(run / "final-sd-vae.safetensors", init="tail",
                    encoder_temporal_downsample=("",) * 4, decoder_temporal_upsample=("",) * 4).eval()
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(video(clip), image(clip), atol=1e-4)


def test_discriminator_and_lpips_terms_are_reported(tmp_path, tiny):
    from cvae_cli.losses import LPIPS

    lpips = LPIPS()  # random weights in the two files' layouts: lpips' vgg.pth and torchvision's VGG16
    torch.manual_seed(0)
    backbone = {f"features.{k.split('.', 1)[1]}": torch.randn_like(v) * 0.05
                for k, v in lpips.state_dict().items() if k.startswith("features.")}
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    save_file(backbone, tmp_path / "vgg16.safetensors")
    save_file(heads, tmp_path / "vgg.safetensors")
    loaded = LPIPS.from_files([tmp_path / "vgg.safetensors", tmp_path / "vgg16.safetensors"])
    x = torch.rand(2, 3, 2, 32, 32) * 2 - 1
    assert torch.equal(loaded(x, x), torch.zeros(2)) and (loaded(x, x.flip(-1)) > 0).all()
    with pytest.raises(CvaeError, match="lack the LPIPS layers lin0..lin4"):
        LPIPS.from_files([tmp_path / "vgg16.safetensors"])
    opts = options(tmp_path / "run", [CLIP], steps=2, disc_start=1, lpips=[str(tmp_path / "vgg.safetensors"),
                                                                          str(tmp_path / "vgg16.safetensors")])
    train(opts, Start(config=str(tiny)))
    rows = read_rows(tmp_path / "run" / "loss.csv")
    assert rows[0]["g_loss"] == "" and rows[1]["g_loss"] and rows[1]["d_loss"] and rows[1]["d_weight"]
    assert all(float(r["lpips"]) > 0 for r in rows)
    assert abs(float(rows[0]["loss"]) - float(rows[0]["l1"]) - float(rows[0]["lpips"])) < 1e-3


def test_unreadable_files_are_skipped_and_said(tmp_path, tiny, small_clip):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.mp4").write_bytes(b"not a video at all")
    (tmp_path / "data" / "small.mp4").write_bytes(small_clip.read_bytes())
    r = cvae("train", "--config", tiny, "--data", tmp_path / "data", "--out", tmp_path / "run", "--steps", "1",
             "-b", "1", "--frames", "5", "--size", "32", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output and "broken.mp4" in r.output
    assert (tmp_path / "run" / "final.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--frames", "6"], "needs 1 + 4k frames"),
    (["--size", "1024"], "smaller than the 1024-pixel crop"),
    (["--data", "{nothing}"], "no usable data"),
    (["--out", "{file}/run"], "is not writable"),
    (["--inflate", "{nothing}/sd.safetensors"], "exactly one starting point"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, tiny, args, message):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "file").write_text("a file, not a folder")
    args = [a.format(nothing=tmp_path / "nothing", file=tmp_path / "file") for a in args]
    base = {"--data": str(PHOTO), "--out": str(tmp_path / "run"), "--frames": "5", "--size": "32"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    r = cvae("train", "--config", tiny, *flat, "--steps", "1", "--workers", "0")
    assert r.exit_code == 1, r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], r.output
    assert not (tmp_path / "run" / "final.safetensors").exists()


def test_out_of_memory_is_one_line_with_a_hint(tmp_path, tiny, monkeypatch):
    from cvae_cli import train as train_module

    def exhausted(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_module.Autoencoder, "forward", exhausted)
    r = cvae("train", "--config", tiny, "--data", PHOTO, "--out", tmp_path / "run", "--steps", "1", "--frames", "1",
             "--size", "32", "--workers", "0")
    assert r.exit_code == 1
    assert "out of memory: try --checkpointing, a smaller --size or --batch-size" in r.output


def test_plot_overlays_runs(tmp_path, tiny):
    pytest.importorskip("matplotlib")
    for name in ("tail", "center"):
        train(options(tmp_path / name, [PHOTO], frames=1, steps=2, val=[str(PHOTO)], val_every=1),
              Start(config=str(tiny)))
    assert (tmp_path / "tail" / "loss.png").exists() and (tmp_path / "tail" / "samples-000001.png").exists()
    r = cvae("plot", tmp_path / "tail", tmp_path / "center", "-o", tmp_path / "fig.png")
    assert r.exit_code == 0, r.output
    from PIL import Image
    assert Image.open(tmp_path / "fig.png").size[0] > 600
    r = cvae("plot", tmp_path / "tail", "-o", tmp_path / "fig.png")
    assert r.exit_code == 1 and "exists" in r.output
    r = cvae("plot", tmp_path / "nothing", "-o", tmp_path / "x.png")
    assert r.exit_code == 1 and "has no loss.csv" in r.output


def test_samples_are_a_function_of_seed_and_index_only():
    data = trainset.survey([CLIP, PHOTO], 32)
    spec = trainset.SampleSpec(frames=5, size=32, image_ratio=0.5, photo_motion=0.5)
    a = trainset.TrainingClips(data, spec, seed=3, global_batch=4)
    b = trainset.TrainingClips(data, spec, seed=3, global_batch=4)
    c = trainset.TrainingClips(data, spec, seed=4, global_batch=4)
    for i in (0, 5, 17):
        assert torch.equal(a[i][0], b[i][0])
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(8))
    shapes = {a[i][0].shape[1] for i in range(40)}
    assert shapes == {1, 5}  # image steps and clip steps
    assert all(a[i][0].shape[1] == a[4 * (i // 4)][0].shape[1] for i in range(40))  # one kind per step
    x = a[1][0]
    assert x.min() >= -1 and x.max() <= 1 and x.shape[2:] == (32, 32)


def test_a_failing_rank_ends_the_job_promptly_with_one_line_naming_it(tmp_path, tiny):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # rank 1 fails at its second step; rank 0 is then mid-step
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import cvae_cli.train as t\n"
        "    step, calls = t.Trainer._step, []\n"
        "    def failing(self, *a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) > 1:\n"
        "            raise RuntimeError('injected failure')\n"
        "        return step(self, *a, **k)\n"
        "    t.Trainer._step = failing\n")
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "cvae_cli", "train", "--config", str(tiny), "--data", str(PHOTO), "--steps", "50",
                        "--frames", "1", "--size", "32", "-b", "1", "--workers", "0", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert time.monotonic() - t0 < 120
    assert r.returncode != 0
    ours = [l for l in r.stderr.splitlines() if l.startswith("error: [rank")]
    assert any(l.startswith("error: [rank 1] RuntimeError: injected failure") for l in ours), r.stderr
    assert not (tmp_path / "run" / "final.safetensors").exists()


def test_activation_checkpointing_computes_the_same_steps(tmp_path, tiny):
    kw = dict(steps=2, log_every=1, save_every=2)
    plain = train(options(tmp_path / "plain", [CLIP], **kw), Start(config=str(tiny)))
    saved = train(options(tmp_path / "ckpt", [CLIP], checkpointing=True, **kw), Start(config=str(tiny)))
    assert losses_of(tmp_path / "plain") == losses_of(tmp_path / "ckpt")
    a, b = load_file(plain), load_file(saved)
    assert list(a) == list(b) and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


# --- as a new user meets it ------------------------------------------------------------------------

IMAGE = {"base": "image", "hidden_size": 32, "hidden_size_mult": [1, 1, 1, 1], "num_res_blocks": 1}


def prepared(tmp_path, config: dict, **kw) -> tuple[Trainer, list[str]]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    notes = []
    from cvae_cli.train import Report
    values = dict(out=tmp_path / "run", data=[str(CLIP), str(PHOTO)], size=32, steps=1000, workers=0)
    trainer = Trainer(from_flat(TrainOptions, {**values, **kw}), Start(config=str(path)), report=Report(note=notes.append))
    trainer.prepare()
    return trainer, notes


def test_an_image_model_trains_on_single_images_unless_told_otherwise_and_then_hears_why_not(tmp_path):
    """`--config image` with the old default of 17 frames ran 17 images a sample through a model
    that codes each alone: 2 minutes a step at 11.8 GB for what one frame teaches."""
    trainer, notes = prepared(tmp_path, IMAGE)
    assert trainer.opts.sample.frames == 1 and not [n for n in notes if n.startswith("warning")]
    assert trainer.identity["frames"] == 1
    trainer, notes = prepared(tmp_path, IMAGE, frames=17)
    assert trainer.opts.sample.frames == 17
    assert [n for n in notes if n.startswith("warning")] == [
        "warning: an image model codes every frame alone: --frames 17 makes each step 17x the work and teaches it "
        "nothing across time (use --frames 1)"]
    trainer, _ = prepared(tmp_path, TINY)
    assert trainer.opts.sample.frames == 17  # a video model keeps clips


@pytest.mark.parametrize("kw, warning", [
    (dict(steps=30, warmup=100), "--warmup 100 is not shorter than --steps 30: the learning rate never reaches "
                                 "--lr 0.0001 (lower --warmup)"),
    (dict(steps=30, warmup=5, ema=0.999), "--ema 0.999 averages over about 1000 steps, against --steps 30: the "
                                          "final weights stay close to the start (lower the decay)"),
    (dict(steps=30, warmup=5, disc_start=30), "--disc-start 30 is not before --steps 30: the discriminator never runs"),
    (dict(frames=1, photo_motion=0.3, stride=2), "--photo-motion 0.3, --stride 2 only apply to clips, and --frames 1 "
                                                 "trains on single images: ignored"),
    (dict(disc_weight=1.0), "--disc-weight only applies with --disc-start: ignored"),
    (dict(perceptual_weight=0.5), "--perceptual-weight only applies with --lpips: ignored"),
])
def test_settings_that_cannot_work_as_meant_are_warned(kw, warning):
    from conftest import tiny_config

    opts = from_flat(TrainOptions, {"out": Path("run"), "data": ["x"], **kw}).resolved(tiny_config())
    assert opts.warnings(tiny_config()) == [warning]
    assert from_flat(TrainOptions, {"out": Path("run"), "data": ["x"]}).resolved(tiny_config()).warnings(tiny_config()) == []
    assert Start(config="x", init="center").warnings() == ["--init center only applies with --inflate: ignored"]


def test_a_log_shows_progress_from_the_first_step_and_a_resume_says_where_it_starts(tmp_path, tiny):
    """A redirected log used to show nothing until the first loss.csv row (20 minutes at 2 minutes a
    step), and a terminal's time left stayed -:--:-- while steps were slower than its sampling."""
    common = ["--config", tiny, "--data", PHOTO, "--frames", "1", "--size", "32", "--workers", "0", "--log-every", "10",
              "--out", tmp_path / "run"]
    r = cvae("train", *common, "--steps", "2", "--warmup", "100")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "warning: --warmup 100 is not shorter than --steps 2" in lines[0]
    assert lines[1].startswith("training 2 steps on cpu: batches of 8 images at 32x32")
    step1 = next(l for l in lines if l.startswith("step 1/2: "))
    assert " a step, " in step1 and step1.endswith(" left") and "-:--:--" not in r.output
    assert any(l.startswith("step 2/2: loss ") for l in lines)
    r = cvae("train", *common, "--steps", "3", "--warmup", "100")
    assert r.exit_code == 0, r.output
    assert f"resuming from step 2 of 3 ({tmp_path / 'run' / 'checkpoint.pt'})" in r.output


def test_train_options_are_declared_once_for_the_command_the_options_and_the_run_identity():
    import typer.main

    from cvae_cli.train import option_fields

    command = typer.main.get_command(app).commands["train"]
    flags = {p.opts[0]: p for p in command.params}
    declared = option_fields(Start) + option_fields(TrainOptions)
    assert set(flags) == {d.flag for d in declared} | {"--quiet"}
    for d in declared:
        assert flags[d.flag].help == d.field.metadata["help"]
    assert flags["--batch-size"].secondary_opts == [] and "-b" in flags["--batch-size"].opts
    # what a checkpoint must agree on: the same keys as before the options were declared once, so
    # runs checkpointed then still resume
    ident = from_flat(TrainOptions, {"out": Path("run"), "data": ["x"], "frames": 5}).identity(Start(config="x"), "d", 1)
    assert set(ident) == {"batch_size", "lr", "warmup", "weight_decay", "clip_grad", "ema", "seed", "frames", "size",
                          "stride", "image_ratio", "photo_motion", "kl_weight", "perceptual_weight", "disc_start",
                          "disc_weight", "train", "start", "data", "world", "lpips"}
    assert ident["frames"] == 5


def test_plot_does_not_import_train():
    """train writes loss.csv and draws it through plot; plot reading it through train was a cycle."""
    import ast

    tree = ast.parse((REPO / "cvae_cli" / "plot.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.split(".")[-1] == "train"}, imported
