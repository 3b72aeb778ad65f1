"""Shared test helpers: where the Open-Sora-Plan reference outputs live, small random models, small
frames and videos, a fake Hugging Face cache. Test files import from here, never from each other."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import av
import numpy as np
import pytest
import torch

from cvae_cli.model import CausalVAE, CausalVAEConfig

REPO = Path(__file__).resolve().parents[1]
# A model that streams exactly: GroupNorm and attention per frame.
FRAME_NORM = dict(norm="frame", encoder_attention="AttnBlock3DFix", decoder_attention="AttnBlock3DFix")
FIXTURES = Path(os.environ.get("CVAE_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixture_file(version: str) -> Path:
    """The reference file for a release; CI (CVAE_REQUIRE_FIXTURES=1) fails where a checkout skips."""
    path = FIXTURES / f"osp-v{version}.safetensors"
    if not path.exists():
        if os.environ.get("CVAE_REQUIRE_FIXTURES") == "1":
            pytest.fail(f"conformance fixture {path} is missing (set CVAE_FIXTURES)")
        pytest.skip(f"conformance fixture {path} not found: set CVAE_FIXTURES to run conformance tests")
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_config(**overrides) -> CausalVAEConfig:
    """The released 4x8x8 layout at toy width, fast enough for the CPU."""
    fields = dict(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=1)
    fields.update(overrides)
    return CausalVAEConfig(**fields)


def random_model(seed: int = 0, **overrides) -> CausalVAE:
    torch.manual_seed(seed)
    model = CausalVAE(tiny_config(**overrides)).eval()
    with torch.no_grad():  # fresh GroupNorm/mix params are trivial; perturb them so tests can fail
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_out.weight", "mix_factor")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def clip(n: int, h: int = 32, w: int = 48, seed: int = 0) -> list[np.ndarray]:
    """`n` random uint8 RGB frames of h x w."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def make_video(path: Path, frames: int = 13, width: int = 94, height: int = 70, fps: int = 24, seed: int = 0) -> Path:
    """An H.264 mp4 of a random picture sliding one pixel a frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:  # index first
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub's cache does: refs/main names a snapshot folder."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(HUB_COMMIT)
    for name, src in files.items():
        dest = folder / "snapshots" / HUB_COMMIT / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)



@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny model that streams exactly (frame norm, per-frame attention), saved as a cvae weights
    file: what the command-level tests encode and decode with, one per test module."""
    from cvae_cli.checkpoints import save_model

    return save_model(random_model(**FRAME_NORM), tmp_path_factory.mktemp("w") / "tiny.safetensors", init="random")

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cvae_process(*args, env_extra: dict | None = None, torchrun: int = 0,
                 inject: str | None = None) -> tuple[list[str], dict]:
    """The command line and environment of `cvae ARGS` as its own process (under torchrun with
    `torchrun` processes), with faults injected by tests/inject.py when `inject` names hooks."""
    target = [str(REPO / "tests" / "inject.py"), inject, "--"] if inject else ["-m", "cvae_cli"]
    launcher = [sys.executable, *target]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}  # torchrun's default, in both runs
    return launcher + [str(a) for a in args], env


def kill_when_reading(args: list, inject_hang: str, marker: Path, what: str) -> None:
    """Run `cvae ARGS` as its own process until it reaches the read that `hang:...` (tests/inject.py)
    names, then SIGKILL it there, as a machine that dies mid-run would."""
    cmd, env = cvae_process(*args, inject=f"{inject_hang}:{marker}")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: marker.exists() or proc.poll() is not None, what)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before {what}"


def wait_for(condition: Callable[[], bool], what: str, limit_s: float = 300) -> None:
    """Poll until `condition()`; the limit only keeps a broken test from hanging the suite."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)
