"""The memory budget: the exact count, the cut that fits, running out of memory, bad numbers."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvae_cli import budget
from cvae_cli.budget import Budget, Policy, candidates, count, count_steps, fit, is_out_of_memory, parse_size
from cvae_cli.checkpoints import save_model
from cvae_cli.errors import CvaeError
from cvae_cli.model import Levers
from cvae_cli.stream import StreamOptions, choose_options
from conftest import REPO, cvae_process, random_model, tiny_config
from test_cli import cvae, make_video

FRAME_NORM = dict(norm="frame", encoder_attention="AttnBlock3DFix", decoder_attention="AttnBlock3DFix")
CPU_OOM = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 26902481760 bytes. "
           "Error code 12 (Cannot allocate memory)")
MiB = 2**20


def test_sizes_parse_strictly():
    assert parse_size("12GiB") == 12 * 2**30 and parse_size("800MiB") == 800 * MiB
    assert parse_size("1.5 GB") == 1_500_000_000 and parse_size("64kib") == 65536
    for bad in ("12", "GiB", "-3GiB", "0MiB", "12 parsecs", "nan", "1e3GiB", "12GiB8"):
        with pytest.raises(CvaeError, match="--memory-budget"):
            parse_size(bad)


def test_out_of_memory_is_recognised_in_the_allocators_own_words():
    assert is_out_of_memory(RuntimeError(CPU_OOM))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("injected failure")) and not is_out_of_memory(ValueError(CPU_OOM))


@pytest.mark.parametrize("options", [StreamOptions(chunk=4, tile=64), StreamOptions(mode="window", tile=64)])
def test_a_replayed_tile_counts_what_running_every_tile_does(options):
    """The count runs one tile's step and replays it for tiles of the same shape: it must give the
    bytes of running every tile (which tests/test_levers.py checks against the CPU's)."""
    meta = budget.meta_model(tiny_config(**FRAME_NORM), torch.float32, Levers())
    for direction in ("encode", "decode"):
        replayed = count_steps(meta, direction, 232, 72, options, frames=9)[0]
        full = count_steps(meta, direction, 232, 72, options, frames=9, replay=False)[0]
        assert replayed == full, (direction, replayed, full)


@pytest.mark.parametrize("norm", ["clip", "frame"])
def test_a_photos_replayed_tiles_count_what_running_every_tile_does(norm):
    """The first one-frame step of a shape leaves storages alive that later steps share: a replay
    must neither add them again nor fail on their absence (with the built-in model, a clip-norm
    photo cut in 1024-pixel tiles failed its count: "replayed step changed live bytes")."""
    from cvae_cli.checkpoints import load_model

    config = load_model(REPO / "weights" / "cvae-small.safetensors", norm=norm, device="meta").config
    options = StreamOptions(mode="window", tile=1024)
    replayed = count_steps(budget.meta_model(config, torch.float32, Levers()), "decode", 1100, 1024, options,
                           image=True)[0]
    full = count_steps(budget.meta_model(config, torch.float32, Levers()), "decode", 1100, 1024, options,
                       image=True, replay=False)[0]
    assert replayed == full


@pytest.mark.parametrize("fields, direction, sizes", [(FRAME_NORM, "encode", [(136, 104)]),
                                                      ({}, "reconstruct", [(200, 136), (136, 200)])],
                         ids=["frame norm", "clip norm"])
def test_the_chosen_cut_fits_and_no_cut_preferred_to_it_does(fields, direction, sizes):
    config = tiny_config(**fields)
    for width, height in sizes:
        mode = "stream" if fields else "window"
        order = candidates(mode, width, height, None, "auto", False)
        peaks = [count(config, torch.float32, Levers(), direction, width, height, o).peak(direction) for o in order]
        for size in sorted(set(peaks))[::2] + [max(peaks) * 2]:
            choice = fit(config, torch.float32, Levers(), Budget(size, direction), mode, width, height)
            k = order.index(choice.options)
            assert choice.fits and choice.peak == peaks[k] <= size
            assert all(p > size for p in peaks[:k]), (width, height, size, choice)
        too_small = fit(config, torch.float32, Levers(), Budget(min(peaks) - 1, direction), mode, width, height)
        assert not too_small.fits and too_small.peak == min(peaks)


def test_a_photo_too_large_for_the_budget_gets_the_largest_tiles_that_fit():
    config = tiny_config(**FRAME_NORM)
    whole = count(config, torch.float32, Levers(), "reconstruct", 400, 300, StreamOptions(), image=True)
    choice = fit(config, torch.float32, Levers(), Budget(whole.peak("reconstruct") - 1), "stream", 400, 300,
                 image=True)
    assert choice.fits and choice.options == StreamOptions(mode="stream", chunk=16, tile=256)
    larger = count(config, torch.float32, Levers(), "reconstruct", 400, 300, StreamOptions(tile=384), image=True)
    assert larger.peak("reconstruct") > choice.budget.bytes  # two overlapping 384-pixel tiles: no gain


def test_a_budget_that_holds_the_whole_window_keeps_a_clip_norm_frame_whole(tmp_path):
    """Today's fixed rule tiled a 640x360 clip-norm window by 256; with a budget that holds the
    whole window it runs untiled, so its latent equals --tile off exactly."""
    weights = save_model(random_model(), tmp_path / "clip.safetensors", init="random")  # released layout
    assert choose_options(tiny_config(), 640, 360).tile == 256
    policy = Policy(tiny_config(), torch.float32, Levers(), Budget(64 * 2**30, "encode"))
    assert policy(640, 360, frames=5) == StreamOptions(mode="window", chunk=16, tile=None)
    make_video(tmp_path / "c.mp4", frames=5, width=640, height=360)
    runs = {}
    for name, extra in (("budget", ["--memory-budget", "64GiB"]), ("off", ["--tile", "off"])):
        r = cvae("encode", tmp_path / "c.mp4", "-o", tmp_path / f"{name}.safetensors", "-w", weights, *extra)
        assert r.exit_code == 0, r.output
        runs[name] = load_file(tmp_path / f"{name}.safetensors")["latent"]
    assert torch.equal(runs["budget"], runs["off"])


def test_dry_run_shows_each_inputs_cut_and_refuses_what_cannot_fit(tmp_path, weights):
    make_video(tmp_path / "a.mp4", frames=5, width=320, height=240)
    r = cvae("encode", tmp_path / "a.mp4", "-w", weights, "--dry-run", "--memory-budget", "8GiB")
    assert r.exit_code == 0 and f"{tmp_path / 'a.mp4'}: 320x240, chunk 16, whole frames, counted" in r.output
    r = cvae("encode", tmp_path / "a.mp4", "-w", weights, "--dry-run", "--memory-budget", "1MiB")
    assert r.exit_code == 1 and "at the smallest cut" in r.output and "--memory-budget" in r.output
    assert not (tmp_path / "a.safetensors").exists()
    r = cvae("encode", tmp_path / "a.mp4", "-w", weights, "--memory-budget", "twelve")
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "error: --memory-budget twelve: expected a size with a unit, e.g. 12GiB or 800MiB"]


def test_a_cut_the_user_gives_wins_with_a_warning(tmp_path, weights):
    make_video(tmp_path / "a.mp4", frames=5, width=96, height=64)
    r = cvae("encode", tmp_path / "a.mp4", "-w", weights, "--chunk", "8", "--tile", "off", "--memory-budget", "1MiB")
    assert r.exit_code == 0, r.output
    assert "warning: 96x64 needs" in r.output and "at the cut given (chunk 8, whole frames)" in r.output
    assert (tmp_path / "a.safetensors").exists()


def test_running_out_of_memory_retries_once_with_a_smaller_cut(tmp_path, weights, monkeypatch):
    from cvae_cli.tiles import Tiler

    make_video(tmp_path / "a.mp4", frames=9, width=96, height=64)
    real, cuts = Tiler.run, []

    def run(self, step, x, final):
        if getattr(step, "__qualname__", "").startswith("encode_step"):  # not the count's steps
            cuts.append((self.tile, x.shape[2]))
            if len(cuts) == 1:
                raise RuntimeError(CPU_OOM)
        return real(self, step, x, final)

    monkeypatch.setattr(Tiler, "run", run)
    r = cvae("encode", tmp_path / "a.mp4", "-w", weights, "--memory-budget", "8GiB")
    assert r.exit_code == 0, r.output
    assert "a.mp4: out of memory at chunk 16, whole frames" in r.output and "retrying once with chunk 12" in r.output
    assert cuts[0] == (None, 9) and cuts[1] == (None, 9)  # 9 frames: one chunk either way
    assert (tmp_path / "a.safetensors").exists()


def test_an_input_out_of_memory_fails_alone_in_one_line(tmp_path, weights):
    """A large input that runs out of memory (the CPU allocator's own error, injected) at every cut
    is reported alone, in one line that says what to do; the small one is written; exit 1."""
    make_video(tmp_path / "big.mp4", frames=5, width=160, height=96)
    make_video(tmp_path / "small.mp4", frames=5, width=64, height=48)
    args, env = cvae_process("encode", tmp_path / "big.mp4", tmp_path / "small.mp4", "-w", weights,
                             "--memory-budget", "8GiB", inject="oom:160")
    r = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors[0].startswith(f"error: {tmp_path / 'big.mp4'}: out of RAM on cpu at chunk 12, whole frames")
    assert "smaller --tile" in errors[0] and "--memory-budget" in errors[0] and "Traceback" not in r.stderr
    assert "retrying once with chunk 12" in r.stderr
    assert (tmp_path / "small.safetensors").exists() and not (tmp_path / "big.safetensors").exists()


def test_a_latent_holding_nan_is_never_written(tmp_path):
    model = random_model(**FRAME_NORM)
    with torch.no_grad():
        model.quant_conv.conv.bias[0] = float("nan")
    weights = save_model(model, tmp_path / "nan.safetensors", init="random")
    make_video(tmp_path / "a.mp4", frames=5)
    for command, output in (("encode", "a.safetensors"), ("reconstruct", "a.recon.mp4")):
        r = cvae(command, tmp_path / "a.mp4", "-w", weights)
        assert r.exit_code == 1 and r.output.strip().splitlines() == [
            f"error: {tmp_path / 'a.mp4'}: the latent holds NaN or infinite values, computed in float32; "
            "nothing was written (try --dtype bf16 or --dtype fp32)"]
        assert not (tmp_path / output).exists() and not list(tmp_path.glob(".a*"))


# VmHWM, not ru_maxrss: Linux keeps the parent's ru_maxrss across exec, so a child of a large
# pytest process would report the parent's peak
MEASURED = """import atexit, runpy, sys
report = sys.argv.pop(1)
hwm = lambda: next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
atexit.register(lambda: open(report, "w").write(hwm()))
sys.argv[0] = "cvae"
runpy.run_module("cvae_cli", run_name="__main__")
"""


def peak_rss(tmp_path: Path, *args) -> int:
    """Peak resident bytes of `cvae ARGS` in its own process, read by itself at exit (VmHWM, KiB)."""
    command, env = cvae_process(*args)
    report = tmp_path / "rss.txt"
    r = subprocess.run([command[0], "-c", MEASURED, str(report), *command[3:]], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(report.read_text()) * 1024


@pytest.mark.skipif(not os.environ.get("CVAE_SLOW_TESTS"), reason="three processes: set CVAE_SLOW_TESTS=1")
def test_a_small_budget_keeps_a_large_clip_within_it_on_the_cpu(tmp_path, weights):
    """The resident set above a tiny run's (the interpreter, torch, PyAV) stays within the budget
    plus what the count does not see on the CPU (allocator arenas of the reader and writer threads,
    oneDNN's buffers: about 170 MiB at any chunk, benchmarks/README.md; the default budget's margin
    is there for it), where chunks of 16 frames would not."""
    make_video(tmp_path / "tiny.mp4", frames=1, width=32, height=32)
    make_video(tmp_path / "large.mp4", frames=17, width=320, height=240)
    runs = {}
    for name, clip, extra in (("base", "tiny.mp4", []), ("budget", "large.mp4", ["--memory-budget", "300MiB"]),
                              ("chunk16", "large.mp4", ["--chunk", "16"])):
        runs[name] = peak_rss(tmp_path, "encode", tmp_path / clip, "-o", tmp_path / f"{name}.safetensors",
                              "-w", weights, "--device", "cpu", *extra)
    assert runs["budget"] - runs["base"] <= (300 + 256) * MiB < runs["chunk16"] - runs["base"], runs


@pytest.mark.skipif(not os.environ.get("CVAE_SLOW_TESTS"), reason="two processes, a minute: set CVAE_SLOW_TESTS=1")
def test_a_budget_holds_the_resident_set_of_a_large_photo_on_the_cpu(tmp_path, weights):
    """oneDNN copies a convolution's input and output to its own layout, as cuDNN does on a GPU: on
    the CPU the count adds them too. Without them a 1 GiB budget took this photo in whole frames,
    counted at 911 MiB, and the resident set rose 1.24 GiB; with them it takes 1024-pixel tiles,
    counted at 913 MiB, and stays under the budget (benchmarks/README.md, the whole-command table)."""
    import numpy as np

    from cvae_cli import media

    rng = np.random.default_rng(0)
    media.write_image(tmp_path / "small.png", rng.integers(0, 256, (32, 32, 3), np.uint8))
    media.write_image(tmp_path / "large.png", rng.integers(0, 256, (1024, 1536, 3), np.uint8))
    runs = {name: peak_rss(tmp_path, "reconstruct", tmp_path / f"{name}.png", "-o", tmp_path / f"{name}.out.png",
                           "-w", weights, "--device", "cpu", "--memory-budget", "1GiB")
            for name in ("small", "large")}
    assert runs["large"] - runs["small"] <= 1024 * MiB, runs
