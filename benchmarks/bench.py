"""Time encode and decode through the library's streaming path, each lever on and off, in one run.

    python benchmarks/bench.py --device cuda --size 1280x720 --frames 17 --out bench-h100.json
    python benchmarks/bench.py --device cpu --size 256x256 --frames 17 --width 32

Random weights in the released v1.0.0 architecture (`--width` narrows it for the CPU). Every row is
a ratio against the whole-clip baseline measured in the same process. FLOPs are counted once on the
whole-clip model (torch.utils.flop_counter) and shared by all rows, which compute the same function.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the peak resident-set growth over
the run (sampled every 2 ms), a rougher figure. Needs no PyAV: frames are synthetic arrays.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli.accel import Acceleration, prepare  # noqa: E402
from cvae_cli.model import CausalVAE, CausalVAEConfig  # noqa: E402
from cvae_cli.stream import StreamOptions, decode_batch, decode_latents, encode_batch, encode_frames  # noqa: E402

LEVERS = {
    "channels_last": Acceleration(channels_last=True),
    "fused_norm": Acceleration(fused_norm=True),
    "cudnn_benchmark": Acceleration(cudnn_benchmark=True),
    "compile": Acceleration(compile=True),
    "all": Acceleration.all(),
}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class Peak:
    """Peak memory over a block: CUDA allocator peak, or sampled RSS growth on the CPU."""

    def __init__(self, device: str):
        self.cuda, self.value = device.startswith("cuda"), 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base, self.top, self.stop = rss(), rss(), threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.top = max(self.top, rss())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
            self.value = max(self.top, rss()) - self.base


def frames_of(n: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """A smooth moving pattern (not noise: the model sees picture-like statistics)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return [(127.5 + 120 * np.stack([np.sin((x + 3 * t + seed) / 17), np.cos((y - 2 * t) / 23),
                                      np.sin((x + y + 5 * t) / 31)], -1)).astype(np.uint8) for t in range(n)]


def timed(fn, device: str, repeat: int) -> tuple[float, int, object]:
    """Best-of-`repeat` seconds (after one warm-up call), peak bytes, and the result."""
    result = fn()  # warm-up: compile, autotune, allocator
    best, peak = float("inf"), 0
    for _ in range(repeat):
        with Peak(device) as p:
            start = time.perf_counter()
            result = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        peak = max(peak, p.value)
    return best, peak, result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="1280x720", help="WxH")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--chunk", type=int, default=4, help="frames per streaming chunk")
    ap.add_argument("--width", type=int, default=128, help="hidden_size (128 = released)")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    ap.add_argument("--batch", type=int, default=2, help="clips per batch for the batching row (0: skip)")
    ap.add_argument("--levers", default=None, help="comma list of " + ",".join(LEVERS) +
                    " (default: all; compile is left out on the CPU, it takes minutes there)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-whole-decode", action="store_true", help="whole-clip decode may not fit memory")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    w, h = map(int, args.size.lower().split("x"))
    levers = args.levers.split(",") if args.levers else [k for k in LEVERS if device.startswith("cuda") or k not in ("compile", "cudnn_benchmark", "all")]
    torch.manual_seed(0)
    base = CausalVAE(CausalVAEConfig(hidden_size=args.width)).eval().to(device, dtype)
    frames = frames_of(args.frames, w, h)

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)[None].to(device, dtype) / 127.5 - 1
        z = base.encode(x).mode()
        enc_flops = counter.get_total_flops()
        base.decode(z)
        dec_flops = counter.get_total_flops() - enc_flops
    del x
    n_out = 1 + 4 * (z.shape[2] - 1)

    rows = []

    def run(name: str, model, mode: str = "stream", batch: int = 1, decode: bool = True):
        opts = StreamOptions(mode=mode, chunk=args.chunk, device=device, dtype=dtype)
        if batch > 1:
            enc = lambda: list(encode_batch(model, [frames] * batch, opts))
            dec = lambda: list(decode_batch(model, [[z[0]]] * batch, opts, h, w))
        else:
            enc = lambda: list(encode_frames(model, frames, opts))
            dec = lambda: list(decode_latents(model, [z[0]], opts, h, w))
        te, pe, _ = timed(enc, device, args.repeat)
        td, pd, _ = (timed(dec, device, args.repeat) if decode else (float("nan"), 0, None))
        row = dict(variant=name, encode_fps=batch * args.frames / te, decode_fps=batch * n_out / td,
                   encode_tflops=batch * enc_flops / te / 1e12, decode_tflops=batch * dec_flops / td / 1e12,
                   encode_peak_gib=pe / 2**30, decode_peak_gib=pd / 2**30)
        rows.append(row)
        print_row(row, rows[0], flush=True)

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}; {w}x{h} x {args.frames} frames, "
          f"width {args.width}, {dtype}, chunk {args.chunk}; {enc_flops / args.frames / 1e12:.3f} TFLOP/frame encode, "
          f"{dec_flops / n_out / 1e12:.3f} decode")
    print(f"{'variant':<22}{'enc fps':>9}{'x':>6}{'TFLOP/s':>9}{'GiB':>8}{'dec fps':>9}{'x':>6}{'TFLOP/s':>9}{'GiB':>8}")
    run("whole (baseline)", base, "whole", decode=not args.skip_whole_decode)
    run("window (v1.1.0)", base, "window", decode=not args.skip_whole_decode)
    run("stream", base)
    for lever in levers:
        run(f"stream+{lever}", prepare(copy.deepcopy(base), LEVERS[lever]))
        torch.backends.cudnn.benchmark = False
    if args.batch > 1:
        run(f"stream batch {args.batch}", base, batch=args.batch)
    if args.out:
        args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                            enc_flops=enc_flops, dec_flops=dec_flops, rows=rows), indent=1))


def print_row(row: dict, ref: dict, flush: bool = False) -> None:
    ratio = lambda k: row[k] / ref[k] if ref[k] == ref[k] and ref[k] else float("nan")
    print(f"{row['variant']:<22}{row['encode_fps']:9.2f}{ratio('encode_fps'):6.2f}{row['encode_tflops']:9.3f}"
          f"{row['encode_peak_gib']:8.2f}{row['decode_fps']:9.2f}{ratio('decode_fps'):6.2f}"
          f"{row['decode_tflops']:9.3f}{row['decode_peak_gib']:8.2f}", flush=flush)


if __name__ == "__main__":
    main()
