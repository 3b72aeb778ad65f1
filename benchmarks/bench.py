"""Every exact lever alone and together, against the plain path: `cvae bench` with all its variants.

    python benchmarks/bench.py --device cpu --size 512x512 --frames 1 --width 64 --repeat 3
    python benchmarks/bench.py --device cpu --size 256x256 --frames 17 --width 64 --repeat 3
    python benchmarks/bench.py --device cuda --size 1280x720 --frames 17 --accel --out bench-h100.json

Random weights in the released v1.0.0 layout (`--width` narrows it for the CPU). Rows: the plain path
(`Levers.off()`, what cvae computed before the exact levers), each exact lever alone, all of them
(the default), and with `--accel` the kernel levers on top (`fast`; `compile` on CUDA). Everything
else (interleaved repeats, medians, peaks, the exact count, FLOPs) is `cvae_cli.bench`'s.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli.bench import VARIANTS, BenchOptions, bench, parse_size  # noqa: E402

EXACT = ("plain", "fold_start", "phase_upsample", "slices", "default")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", default="1280x720", help="WxH")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--chunk", type=int, default=16, help="frames per streaming chunk (16: a 17-frame clip in one)")
    ap.add_argument("--width", type=int, default=128, help="hidden_size (128 = released)")
    ap.add_argument("--norm", default="clip", choices=("clip", "frame"), help="clip: the released checkpoints")
    ap.add_argument("--dtype", default="auto", help="bf16 on CUDA, fp32 on the CPU by default")
    ap.add_argument("--rows", default=None, help="comma list of " + ",".join(VARIANTS))
    ap.add_argument("--accel", action="store_true", help="add the kernel levers: fast, and compile on CUDA")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved timed runs per row, after one warm-up round")
    ap.add_argument("--out", type=Path, default=None, help="write the records as JSON here (a new file)")
    args = ap.parse_args(argv)

    cuda = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    rows = args.rows.split(",") if args.rows else [*EXACT, *(("fast", "compile") if cuda else ("fast",))
                                                   * args.accel]
    w, h = parse_size(args.size)
    bench(BenchOptions(width=w, height=h, frames=args.frames, chunk=args.chunk, dtype=args.dtype, device=args.device,
                       variants=tuple(rows), repeat=args.repeat, hidden_size=args.width, norm=args.norm), args.out)


if __name__ == "__main__":
    main()
