"""Peak memory of streaming encode and decode, counted exactly at the real frame size.

    python benchmarks/memory.py --targets 720p,1080p,4K --chunk 4 --tile 512          # seconds
    python benchmarks/memory.py --device cpu --dtype float32 --targets 64x48 --width 32 # the same count, computed

    python benchmarks/memory.py --budgets 8,24,80,140 --copies                            # the cut each budget gets

The count is `cvae_cli.budget` (what `--memory-budget` uses): `LiveTensorBytes` adds up every tensor
alive at once, op by op, on the meta device (shapes only, no arithmetic and no memory), so a 4K count
takes seconds and does not depend on how busy the machine is. On the CPU (`--device cpu`) the same
count gives the same bytes (tests/test_levers.py checks it). It sees the model's own tensors
(activations, causal caches, inputs and outputs, blend buffers); backend scratch and allocator slack
come on top (cuDNN's and oneDNN's copies of one convolution's input and output: `--copies` adds them).
Weights are not counted in the rows (v1.0.0: 229 M parameters, 0.43 GiB in bf16); `--budgets`
counts them.

Steps run as `stream` runs them: encode chunks of 1 + c, c, c frames; decode the same in latents,
then the empty step that flushes; a photo is one frame through encode, then decode. `--tile` cuts
every frame into `tiles.Tiler`'s overlapping tiles, each with its own caches, for frames larger
than one tile. Rows: the plain path (`Levers.off()`) and the levers (`Levers()`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli.budget import Budget, LiveTensorBytes, Policy, count_steps, describe_cut  # noqa: E402,F401
from cvae_cli.errors import CvaeError  # noqa: E402
from cvae_cli.model import CausalVAE, CausalVAEConfig, Levers  # noqa: E402
from cvae_cli.stream import AUTO_TILE, TILE_ABOVE, StreamOptions  # noqa: E402

TARGETS = {"720p": (1280, 720), "1080p": (1920, 1088), "4K": (3840, 2160)}


def measure(model: CausalVAE, width: int, height: int, chunk: int = 4, tile: int | None = None,
            explain: bool = False) -> dict:
    """Peak live bytes streaming a video (encode: chunks of 1 + c, c, c frames; decode: the same in
    latents, then the flush), and of a photo (one frame, encode then decode), with the largest
    total of caches kept between steps; on the model's device and dtype (`budget.count_steps`). With
    `explain`, also what was alive at each peak."""
    options, out = StreamOptions(chunk=chunk, tile=tile), {}
    for direction in ("encode", "decode"):
        steps, counter = count_steps(model, direction, width, height, options, explain=explain, replay=not explain)
        out[direction], out[direction + " caches"], out[direction + " at"] = steps.peak, steps.held, counter.at_peak
    photo = [count_steps(model, d, width, height, options, image=True, explain=explain)[0] for d in ("encode", "decode")]
    out["photo"], out["photo at"] = max(s.peak for s in photo), ("", [])
    return out


def config_for(norm: str, width: int) -> CausalVAEConfig:
    """The released layout at `width`, clip norm as released, or frame norm with per-frame attention
    (the inflated models: they stream exactly)."""
    fields = dict(norm=norm) if norm == "clip" else dict(norm="frame", encoder_attention="AttnBlock3DFix",
                                                          decoder_attention="AttnBlock3DFix")
    return CausalVAEConfig(hidden_size=width, **fields)


def budget_table(args) -> None:
    """The cut `--chunk auto --tile auto` takes under each budget, and its counted peak (weights
    and, with --copies, the backend's copies included, as the CLI counts them), for encode and decode."""
    dtype = getattr(torch, args.dtype)
    budgets = [float(b) for b in args.budgets.split(",")]
    print(f"# torch {torch.__version__}; {dtype}; hidden_size {args.width}; counted on the meta device"
          f"{', with the backend copies' if args.copies else ''}. Cut chosen (counted GiB):")
    print("| norm | size | direction | " + " | ".join(f"{b:g} GiB" for b in budgets) + " |")
    print("|---|---|---|" + "---|" * len(budgets))
    for norm in args.norms.split(","):
        config = config_for(norm, args.width)
        for name in args.targets.split(","):
            w, h = size(name)
            for direction in ("encode", "decode"):
                cells = []
                for b in budgets:
                    policy = Policy(config, dtype, Levers(), Budget(int(b * 2**30), direction, args.copies))
                    t = time.perf_counter()
                    try:
                        choice = policy.choice(w, h)
                        cells.append(f"{describe_cut(choice.options)} ({choice.peak / 2**30:.1f})")
                    except CvaeError:
                        cells.append(f"does not fit ({policy.last.peak / 2**30:.1f})")
                    print(f"#   {norm} {name} {direction} {b:g} GiB: chosen in {time.perf_counter() - t:.2f} s",
                          file=sys.stderr, flush=True)
                print(f"| {norm} | {name} | {direction} | " + " | ".join(cells) + " |", flush=True)


def choice_cost(args) -> None:
    """CPU seconds to choose a cut at each size (count cache cleared first), and again (cached)."""
    from cvae_cli.budget import _counted

    dtype, gib = getattr(torch, args.dtype), float(args.cost)
    for norm in args.norms.split(","):
        config = config_for(norm, args.width)
        for name in args.targets.split(","):
            w, h = size(name)
            for direction in ("encode", "decode"):
                _counted.cache_clear()
                policy = Policy(config, dtype, Levers(), Budget(int(gib * 2**30), direction, args.copies))
                wall, cpu = time.perf_counter(), time.process_time()
                try:
                    o = policy.choice(w, h).options
                    chosen = f"{o.mode} chunk {o.chunk} tile {o.tile}"
                except CvaeError:
                    chosen = "does not fit"
                counts = _counted.cache_info().misses
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                again = time.process_time()
                if chosen != "does not fit":
                    policy.choice(w, h)
                again = time.process_time() - again
                print(f"| {norm} | {name} | {direction} | {gib:g} | {chosen} | {counts} | {cpu:.2f} | "
                      f"{cpu / counts:.2f} | {again * 1000:.1f} | {wall:.1f} |", flush=True)


def size(text: str) -> tuple[int, int]:
    if text in TARGETS:
        return TARGETS[text]
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="720p,1080p,4K", help=f"names from {', '.join(TARGETS)} or WxH")
    ap.add_argument("--chunk", type=int, default=4, help="frames per streaming chunk")
    ap.add_argument("--tile", type=int, default=512, help="tile side in pixels for the tiled rows (0: untiled only)")
    ap.add_argument("--width", type=int, default=128, help="hidden_size (128 = released)")
    ap.add_argument("--norm", default="frame", choices=("frame", "clip"),
                    help="frame: streaming is exact and the slices run (clip: they are off)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="meta", help="meta: shapes only (seconds at 4K); cpu: computed")
    ap.add_argument("--explain", action="store_true", help="print the op and the largest tensors alive at each peak")
    ap.add_argument("--budgets", help="instead: the cut chosen under each budget (GiB, e.g. 8,24,80,140)")
    ap.add_argument("--norms", default="frame,clip", help="with --budgets: the norms to count")
    ap.add_argument("--copies", action="store_true",
                    help="with --budgets/--cost: add the backend's copies of the largest convolution's input and "
                         "output (cuDNN's, oneDNN's), as the CLI does")
    ap.add_argument("--cost", help="instead: the CPU cost of choosing a cut under this budget (GiB)")
    args = ap.parse_args(argv)
    if args.cost:
        return choice_cost(args)
    if args.budgets:
        return budget_table(args)

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = CausalVAE(CausalVAEConfig(hidden_size=args.width, norm=args.norm)).eval().to(dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"# torch {torch.__version__}; {args.device} device, {dtype}; chunk {args.chunk}; hidden_size {args.width}, "
          f"{args.norm} norm; weights {weights / 2**30:.2f} GiB (not counted below); `--tile auto` tiles photos "
          f"above {TILE_ABOVE} pixels (1920x1088) by {AUTO_TILE} and keeps an exact stream's frames whole. Peak GiB:")
    print(f"{'size':>10} {'tile':>5} {'path':<7}{'encode':>8}{'caches':>8}{'decode':>8}{'caches':>8}{'photo':>8}")
    gib = lambda b: b / 2**30
    for name in args.targets.split(","):
        w, h = size(name)
        for tile in [None] + ([args.tile] if args.tile and max(w, h) > args.tile else []):
            for path, levers in (("plain", Levers.off()), ("levers", Levers())):
                m = measure(model.use_levers(levers), w, h, args.chunk, tile)
                print(f"{w:>5}x{h:<4} {tile or '-':>5} {path:<7}" + "".join(
                    f"{gib(m[k]):8.2f}" for k in ("encode", "encode caches", "decode", "decode caches", "photo")),
                    flush=True)
                if args.explain:
                    for k in ("encode", "decode", "photo"):
                        op, alive = m[k + " at"]
                        print(f"    {k} peak at {op}: " + ", ".join(f"{gib(b):.2f} {list(s)}" for b, s in alive))


if __name__ == "__main__":
    main()
