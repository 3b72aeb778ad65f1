"""Warm-up and steady speed of `--compile`: the model compiled per block (`Levers(compile=True)`)
against the whole encoder and decoder step compiled (how `--compile` worked before), and eager.

    python benchmarks/compile.py --variant whole     # one variant's warm-up, in a fresh process
    python benchmarks/compile.py --variant blocks
    python benchmarks/compile.py --variant blocks,whole,eager --repeat 3   # steady speed, interleaved

Random weights of the released v1.0.0 layout (clip norm). A pass encodes the clip in chunks and
decodes its latents, through the library's streaming path; warm-up is the first pass's time less a
steady pass's, in
wall seconds and in CPU seconds (this process and the compilers it ran). Steady passes of several variants are interleaved, so a loaded machine slows them
alike; each figure is a median. The inductor cache on disk is off: every warm-up compiles.
Needs no PyAV: frames are synthetic arrays.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile in this process: its CPU time is counted

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli.bench import frames_of  # noqa: E402
from cvae_cli.model import CausalVAE, CausalVAEConfig, Levers  # noqa: E402
from cvae_cli.stream import StreamOptions, decode_latents, encode_frames  # noqa: E402


def prepared(base: CausalVAE, variant: str) -> CausalVAE:
    model = copy.deepcopy(base)
    if variant == "blocks":
        model.use_levers(Levers(compile=True))
    elif variant == "whole":  # before: the encoder and decoder step, dynamic in every size
        model.encoder.compile(dynamic=True)
        model.decoder.compile(dynamic=True)
    return model


def cpu_seconds() -> float:
    """CPU time of this process and the compilers it ran: on a shared machine, where wall time
    depends on the neighbours, the work itself."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage,
                                                    (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def one_pass(model: CausalVAE, frames, opts: StreamOptions, h: int, w: int) -> tuple[float, float, float, float]:
    """(encode, decode) wall seconds, then (encode, decode) CPU seconds."""
    start, cpu0 = time.perf_counter(), cpu_seconds()
    z = torch.cat([m for m, _ in encode_frames(model, frames, opts)], 1)
    middle, cpu1 = time.perf_counter(), cpu_seconds()
    for _ in decode_latents(model, [z], opts, h, w):
        pass
    return middle - start, time.perf_counter() - middle, cpu1 - cpu0, cpu_seconds() - cpu1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="blocks", help="comma list of blocks, whole, eager")
    ap.add_argument("--size", default="256x256", help="WxH")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--width", type=int, default=128, help="hidden_size (128 = released)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=2, help="steady passes per variant, interleaved")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    w, h = map(int, args.size.lower().split("x"))
    torch.manual_seed(0)
    base = CausalVAE(CausalVAEConfig(hidden_size=args.width)).eval().to(args.device, getattr(torch, args.dtype))
    frames, opts = frames_of(args.frames, w, h), StreamOptions(chunk=args.chunk)
    names = args.variant.split(",")
    models = {name: prepared(base, name) for name in names}
    first, graphs = {}, {}
    with torch.inference_mode():
        for name in names:  # the first variant's warm-up is the one to report: later ones may reuse its kernels
            before = counters["stats"]["unique_graphs"]
            first[name] = one_pass(models[name], frames, opts, h, w)
            graphs[name] = counters["stats"]["unique_graphs"] - before
            print(f"# {name}: first pass {sum(first[name][:2]):.1f} s wall, {sum(first[name][2:]):.1f} s CPU, "
                  f"{graphs[name]} graphs", flush=True)
        steady = {name: [] for name in names}
        for _ in range(args.repeat):
            for name in names:
                steady[name].append(one_pass(models[name], frames, opts, h, w))
    n_out = args.frames
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device} {args.dtype}; "
          f"{w}x{h} x {args.frames} frames, chunk {args.chunk}, width {args.width}, v1.0.0 layout (clip norm); "
          f"median of {args.repeat} interleaved steady passes")
    print(f"{'variant':<8}{'warm-up s':>10}{'CPU s':>8}{'graphs':>7}{'enc f/s':>9}{'dec f/s':>9}{'enc CPU s/f':>12}"
          f"{'dec CPU s/f':>12}")
    rows = []
    for name in names:
        med = [statistics.median(s[i] for s in steady[name]) for i in range(4)]
        row = dict(variant=name, first=first[name], graphs=graphs[name], warmup_s=sum(first[name][:2]) - med[0] - med[1],
                   warmup_cpu_s=sum(first[name][2:]) - med[2] - med[3], encode_fps=args.frames / med[0],
                   decode_fps=n_out / med[1], encode_cpu_s_per_frame=med[2] / args.frames,
                   decode_cpu_s_per_frame=med[3] / n_out, steady=steady[name])
        rows.append(row)
        print(f"{name:<8}{row['warmup_s']:10.1f}{row['warmup_cpu_s']:8.1f}{graphs[name]:7d}{row['encode_fps']:9.2f}"
              f"{row['decode_fps']:9.2f}{row['encode_cpu_s_per_frame']:12.3f}{row['decode_cpu_s_per_frame']:12.3f}",
              flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1))


if __name__ == "__main__":
    main()
