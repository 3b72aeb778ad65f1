"""Run the cvae command line with a fault injected, so a test can stop a process at a known point
instead of racing it:

    python tests/inject.py HOOK... -- cvae arguments

Hooks (several may be given, separated by `,`):
  hang:INPUT:FRAMES:MARKER  the INPUT-th input read (0-based) yields FRAMES frames, creates the file
                            MARKER, then never yields another: it waits at a safe point, so a signal
                            stops it the way a slow read would be stopped.
  fail:RANK                 on rank RANK (the RANK environment variable), encoding raises
                            RuntimeError("injected failure") as a bug would.
  oom:WIDTH                 every model step on frames WIDTH pixels wide or more raises the CPU
                            allocator's own out-of-memory RuntimeError, at any cut.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvae_cli import convert, interrupt, media, tiles  # noqa: E402
from cvae_cli.cli import app  # noqa: E402


def hang(index: int, frames: int, marker: str) -> None:
    real, calls = media.MediaFile.timed_frames, [0]

    def frames_then_hang(self, **selection):
        call, calls[0] = calls[0], calls[0] + 1
        for i, frame in enumerate(real(self, **selection)):
            if call == index and i == frames:
                Path(marker).touch()
                while True:
                    interrupt.check()
                    time.sleep(0.02)
            yield frame

    media.MediaFile.timed_frames = frames_then_hang


def fail(rank: int) -> None:
    if int(os.environ.get("RANK", "0")) == rank:
        def broken(*args, **kwargs):
            raise RuntimeError("injected failure")

        convert.encode_files = broken


def oom(width: int) -> None:
    real = tiles.Tiler.run

    def run(self, step, x, final):
        if x.shape[-1] >= width and x.device.type != "meta":  # the model, not the budget's count
            raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                               f"{x.numel() * 4096} bytes. Error code 12 (Cannot allocate memory)")
        return real(self, step, x, final)

    tiles.Tiler.run = run


if __name__ == "__main__":
    split = sys.argv.index("--")
    for hook in ",".join(sys.argv[1:split]).split(","):
        name, *args = hook.split(":")
        {"hang": lambda i, n, m: hang(int(i), int(n), m), "fail": lambda r: fail(int(r)),
         "oom": lambda w: oom(int(w))}[name](*args)
    sys.argv = ["cvae"] + sys.argv[split + 1:]
    app()
