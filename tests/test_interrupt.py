"""Stopping: Ctrl-C and SIGTERM act at the next chunk or tile, remove every temporary file, end
every thread, and exit non-zero with one line."""
from __future__ import annotations

import signal
import subprocess
import threading

import numpy as np
import pytest
import torch

from cvae_cli import interrupt, prefetch
from cvae_cli.stream import StreamOptions, encode_frames
from cvae_cli.tiles import Tiler
from conftest import FRAME_NORM, REPO, cvae_process, make_video, random_model, wait_for

@pytest.fixture(autouse=True)
def no_pending_stop():
    interrupt.clear()
    yield
    interrupt.clear()


def test_a_stop_acts_between_chunks():
    model = random_model(**FRAME_NORM)
    frames = [np.zeros((16, 16, 3), np.uint8)] * 13
    chunks = encode_frames(model, frames, StreamOptions(chunk=4))
    next(chunks)
    interrupt.request("interrupted (SIGINT)")
    with pytest.raises(interrupt.Interrupted, match="SIGINT"):
        next(chunks)


def test_a_stop_acts_between_tiles():
    calls = []

    def step(x, cache):
        calls.append(x.shape)
        interrupt.request("interrupted (SIGTERM)", 143)  # asked during the first tile
        return x

    with pytest.raises(interrupt.Interrupted) as e:
        Tiler(64, 1.0, streaming=False).run(step, torch.zeros(1, 3, 1, 64, 160), final=True)
    assert len(calls) == 1 and e.value.status == 143


def test_background_thread_ends_with_its_consumer():
    started, release = threading.Event(), threading.Event()

    def slow():
        yield 0
        started.set()
        release.wait(5)  # a long step (a model call) that a stop cannot cut short
        yield 1

    items = prefetch.background(slow(), 1)
    assert next(items) == 0
    started.wait(5)
    interrupt.request("interrupted (SIGINT)")
    threading.Timer(0.2, release.set).start()
    with pytest.raises(interrupt.Interrupted):
        next(items)  # the consumer stops while the producer is busy...
    assert not [t for t in threading.enumerate() if t.name == "cvae-background"]  # ...and waits for it


def stopped(tmp_path, sig: signal.Signals, *args: str) -> subprocess.CompletedProcess:
    """Run `cvae ARGS`, whose first input stops after 6 frames (a writer is mid-file then), send
    `sig` once it is there, and return the finished process."""
    marker = tmp_path / "reading"
    cmd, env = cvae_process(*args, inject=f"hang:0:6:{marker}")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: marker.exists() or proc.poll() is not None, "the command to read its input")
    marker.unlink()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_sigterm_stops_encode_cleanly(tmp_path, weights):
    make_video(tmp_path / "v.mp4", frames=21, width=64, height=48)
    r = stopped(tmp_path, signal.SIGTERM, "encode", tmp_path / "v.mp4", "-w", weights, "--chunk", "4")
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip() == "error: interrupted (SIGTERM): no partial output was kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # no output, no .v.safetensors.*.raw


@pytest.mark.parametrize("attempt", range(2))
def test_ctrl_c_stops_reconstruct_and_its_threads_cleanly(tmp_path, weights, attempt):
    make_video(tmp_path / "v.mp4", frames=21, width=64, height=48)
    r = stopped(tmp_path, signal.SIGINT, "reconstruct", tmp_path / "v.mp4", "-w", weights, "--chunk", "4")
    assert r.returncode == 130, r.stderr  # not 134: no thread left running at exit
    assert r.stderr.strip() == "error: interrupted (SIGINT): no partial output was kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
