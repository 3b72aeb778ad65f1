"""Time encode and decode through the library's streaming path with each lever on and off, in one run.

    python benchmarks/bench.py --device cpu --size 512x512 --frames 1 --width 64 --repeat 3
    python benchmarks/bench.py --device cpu --size 256x256 --frames 17 --width 64 --repeat 3
    python benchmarks/bench.py --device cuda --size 1280x720 --frames 17 --accel --out bench-h100.json

Random weights in the released v1.0.0 architecture (`--width` narrows it for the CPU). The rows are
the plain path (`Levers.off()`, what cvae computed before the exact levers), each exact lever alone,
all of them (the default), and with `--accel` the inference-only levers of `cvae_cli.accel` on top.
Repeats are interleaved (plain, lever, ..., plain, lever, ...), so a loaded machine slows every row
alike; each row's figure is its median, and `x` is the ratio to the plain row's median. FLOPs per
frame are counted for each row on the meta device (torch.utils.flop_counter: no arithmetic runs).
Peak memory is torch.cuda.max_memory_allocated on CUDA; on the CPU see memory.py, which counts exactly.
Needs no PyAV: frames are synthetic arrays.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli.accel import Acceleration, prepare  # noqa: E402
from cvae_cli.model import CausalVAE, CausalVAEConfig, Levers  # noqa: E402
from cvae_cli.stream import StreamOptions, decode_latents, encode_frames  # noqa: E402

LEVERS = {
    "plain": Levers.off(),
    "fold_start": Levers(phase_upsample=False, slice_elements=None),
    "phase_upsample": Levers(fold_start=False, slice_elements=None),
    "slices": Levers(fold_start=False, phase_upsample=False),
    "levers (default)": Levers(),
}
ACCEL = {
    "levers+channels_last": Acceleration(channels_last=True),
    "levers+fused_norm": Acceleration(fused_norm=True),
    "levers+compile": Acceleration(compile=True),
    "levers+all": Acceleration.all(),
}


def frames_of(n: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """A smooth moving pattern (not noise: the model sees picture-like statistics)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return [(127.5 + 120 * np.stack([np.sin((x + 3 * t + seed) / 17), np.cos((y - 2 * t) / 23),
                                      np.sin((x + y + 5 * t) / 31)], -1)).astype(np.uint8) for t in range(n)]


def flops(config: CausalVAEConfig, levers: Levers, frames: int, height: int, width: int) -> tuple[int, int]:
    """(encode, decode) FLOPs of one clip, counted on the meta device: shapes only, no arithmetic."""
    with torch.device("meta"):
        model = CausalVAE(config).eval().use_levers(levers)
        x = torch.zeros(1, 3, frames, height, width)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        z = model.encode(x).mean
        encode = counter.get_total_flops()
        model.decode(z)
    return encode, counter.get_total_flops() - encode


class Peak:
    """CUDA allocator peak over a block, above what was allocated before it (0 elsewhere): the
    benchmark holds one model per row, and a user's process holds one."""

    def __init__(self, device: str):
        self.cuda, self.value, self.before = device.startswith("cuda"), 0, 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated() - self.before


def timed(fn, device: str) -> tuple[float, int]:
    with Peak(device) as peak:
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, peak.value


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="1280x720", help="WxH")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--chunk", type=int, default=16, help="frames per streaming chunk (16: a 17-frame clip in one)")
    ap.add_argument("--width", type=int, default=128, help="hidden_size (128 = released)")
    ap.add_argument("--norm", default="clip", choices=("clip", "frame"), help="clip: the released checkpoints")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    ap.add_argument("--rows", default=None, help="comma list of " + ",".join([*LEVERS, *ACCEL]) + " (default: "
                    "the exact levers; with --accel also channels_last and fused_norm, and on CUDA compile and all)")
    ap.add_argument("--accel", action="store_true", help="add the inference-only accel levers on top of the default")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved timed runs per row, after one warm-up round")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    device = args.device
    cuda = device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    w, h = map(int, args.size.lower().split("x"))
    names = args.rows.split(",") if args.rows else [*LEVERS, *(
        [k for k in ACCEL if cuda or k in ("levers+channels_last", "levers+fused_norm")] if args.accel else [])]
    config = CausalVAEConfig(hidden_size=args.width, norm=args.norm)
    torch.manual_seed(0)
    base = CausalVAE(config).eval().to(device, dtype)
    models = {}
    for name in names:
        if name in LEVERS:
            models[name] = copy.deepcopy(base).use_levers(LEVERS[name])
        else:
            models[name] = prepare(copy.deepcopy(base).use_levers(Levers()), ACCEL[name])
    weights = sum(t.numel() * t.element_size() for t in (*base.parameters(), *base.buffers()))
    frames = frames_of(args.frames, w, h)
    opts = StreamOptions(chunk=args.chunk)
    z = torch.cat([m for m, _ in encode_frames(base, frames, opts)], 1)
    n_out = 1 + 4 * (z.shape[1] - 1)
    counted = {name: flops(config, models[name].levers, args.frames, h, w) for name in names}

    times = {name: ([], []) for name in names}
    peaks = {name: [0, 0] for name in names}
    for round_ in range(args.repeat + 1):  # round 0 warms up (oneDNN primitives, compile, autotune)
        for name in names:
            for j, fn in enumerate((lambda: list(encode_frames(models[name], frames, opts)),
                                    lambda: list(decode_latents(models[name], [z], opts, h, w)))):
                seconds, peak = timed(fn, device)
                if round_:
                    times[name][j].append(seconds)
                    peaks[name][j] = max(peaks[name][j], peak + weights)
        torch.backends.cudnn.benchmark = False  # only rows that ask for it (prepare sets it)

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}; {w}x{h} x {args.frames} frames, width {args.width}, "
          f"{args.norm} norm, {dtype}, chunk {args.chunk}; median of {args.repeat} interleaved runs"
          + (f"; GiB: allocator peak above the start of each run, plus one model's weights ({weights / 2**30:.2f})"
             if cuda else ""))
    print(f"{'variant':<22}{'enc GFLOP/f':>12}{'enc s':>8}{'x':>6}{'dec GFLOP/f':>12}{'dec s':>8}{'x':>6}"
          + (f"{'enc GiB':>8}{'dec GiB':>8}" if cuda else ""))
    rows = []
    ref = [statistics.median(times[names[0]][j]) for j in (0, 1)]
    for name in names:
        med = [statistics.median(times[name][j]) for j in (0, 1)]
        row = dict(variant=name, encode_gflop_per_frame=counted[name][0] / args.frames / 1e9,
                   decode_gflop_per_frame=counted[name][1] / n_out / 1e9,
                   encode_s=med[0], decode_s=med[1], encode_x=ref[0] / med[0], decode_x=ref[1] / med[1],
                   encode_fps=args.frames / med[0], decode_fps=n_out / med[1],
                   encode_runs=times[name][0], decode_runs=times[name][1],
                   encode_peak_gib=peaks[name][0] / 2**30, decode_peak_gib=peaks[name][1] / 2**30)
        rows.append(row)
        print(f"{name:<22}{row['encode_gflop_per_frame']:12.2f}{med[0]:8.2f}{row['encode_x']:6.2f}"
              f"{row['decode_gflop_per_frame']:12.2f}{med[1]:8.2f}{row['decode_x']:6.2f}"
              + (f"{row['encode_peak_gib']:8.2f}{row['decode_peak_gib']:8.2f}" if cuda else ""), flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1))


if __name__ == "__main__":
    main()
