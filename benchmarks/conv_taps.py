"""Is it worth running a streaming step's causal conv as separate time taps, to save memory?

A causal 3x3x3 conv fed one new frame builds a window of 3 frames (its 2 cached frames and the new
one) and convolves it. At 720p that window is the largest transient of a decode step (decoder level
0's first conv reads 256 channels: 1.32 GiB in bf16, see README "Memory, counted exactly"). The same
output is the sum of three 2-D convs, one per tap, each on a frame already in memory: no window.
This times both on the CPU, interleaved, and checks that they agree.

    python benchmarks/conv_taps.py --size 384 --repeat 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def window_conv(past: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What `CausalConv3d` does today: concatenate the cached frames and the new one, then conv3d."""
    return F.conv3d(torch.cat([past, x], 2), w, b, padding=(0, 1, 1))


def tap_convs(past: torch.Tensor, x: torch.Tensor, taps: list[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    """The same output as three 2-D convs summed: tap 2 on the new frame, taps 1 and 0 on the cache."""
    y = F.conv2d(x[:, :, 0], taps[2], b, padding=1)
    y.add_(F.conv2d(past[:, :, 1], taps[1], None, padding=1))
    y.add_(F.conv2d(past[:, :, 0], taps[0], None, padding=1))
    return y.unsqueeze(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=384, help="square frame side in pixels")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {args.size}x{args.size}, "
          f"one new frame, median of {args.repeat} interleaved runs")
    print(f"{'cin':>5}{'cout':>6}{'window s':>10}{'taps s':>9}{'taps/window':>13}{'rel diff':>10}")
    for cin, cout in ((256, 128), (128, 128)):
        past = torch.randn(1, cin, 2, args.size, args.size)
        x = torch.randn(1, cin, 1, args.size, args.size)
        w = torch.randn(cout, cin, 3, 3, 3) * 0.02
        b = torch.randn(cout)
        taps = [w[:, :, k].contiguous() for k in range(3)]
        fns = {"window": lambda: window_conv(past, x, w, b), "taps": lambda: tap_convs(past, x, taps, b)}
        ref, alt = fns["window"](), fns["taps"]()  # also the warm-up
        times = {name: [] for name in fns}
        for _ in range(args.repeat):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        diff = ((ref - alt).norm() / ref.norm()).item()
        print(f"{cin:5d}{cout:6d}{med['window']:10.3f}{med['taps']:9.3f}{med['taps'] / med['window']:13.2f}{diff:10.1e}")


if __name__ == "__main__":
    main()
