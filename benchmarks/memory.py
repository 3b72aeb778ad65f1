"""Peak memory of streaming encode and decode, counted exactly on the CPU and extrapolated by size.

    python benchmarks/memory.py --fit 64x48,128x80,192x112 --chunk 4

`LiveTensorBytes` adds up every tensor alive at once, op by op, so it needs no GPU and no timing.
It sees the model's own tensors (activations, causal caches, inputs and outputs): backend scratch
(cuDNN / oneDNN workspaces) and allocator slack come on top, so a GPU's `max_memory_allocated`
reads somewhat higher. Activations grow with the pixel count and nothing else, so runs at small
frame sizes, fitted by a line, predict a large one (the third fit size checks the line). The fit
runs in float32; bf16 halves the activations. Weights are reported apart (v1.0.0: 229 M parameters).

Each target is predicted with the plain path (`Levers.off()`) and with the levers, whose slices
are scaled to the fit sizes so that every stage runs as many frames per slice as at the target.
Tiled rows (`--tile`, in pixels) add up one tile's peak and the causal caches of all other tiles,
which stay alive from chunk to chunk (what the streaming caches are, is counted separately).
"""
from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli.model import CausalVAE, CausalVAEConfig, Levers, StreamCache  # noqa: E402
from cvae_cli.stream import Tiler  # noqa: E402

TARGETS = {"720p": (1280, 720), "1080p": (1920, 1088), "4K": (3840, 2160)}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storage alive at once, counted exactly: every op's outputs are
    tracked until the last tensor viewing their storage is garbage. Tensors made before entering
    (the weights) are not counted."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                key = t.untyped_storage().data_ptr()
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                    self.live += self.sizes[key]
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key)
        return out

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]


def cache_bytes(cache: StreamCache) -> int:
    leaves = [t for v in cache.state.values() for t in (v if isinstance(v, tuple) else (v,))]
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


@torch.inference_mode()
def measure(model: CausalVAE, width: int, height: int, chunk: int) -> dict[str, int]:
    """Peak live bytes and steady causal-cache bytes streaming 1 + 3*chunk frames (encode: chunks of
    1 + c, c, c; decode: one latent a step, then the empty step that flushes), as `stream` runs them."""
    x = torch.rand(1, 3, 1 + 3 * chunk, height, width) * 2 - 1
    cuts = [0, 1 + chunk, 1 + 2 * chunk, 1 + 3 * chunk]
    cache, out = StreamCache(), {}
    with LiveTensorBytes() as counter:
        for i in range(3):
            cache.final = i == 2
            model.encode(x[:, :, cuts[i]:cuts[i + 1]], cache)
            out["encode caches"] = max(out.get("encode caches", 0), cache_bytes(cache))
    out["encode"] = counter.peak
    z = torch.randn(1, model.config.embed_dim, 1 + 3 * chunk // 4, height // 8, width // 8)
    cache = StreamCache()
    with LiveTensorBytes() as counter:
        for i in range(z.shape[2] + 1):
            cache.final = i == z.shape[2]
            model.decode(z[:, :, i:i + 1], cache)
            out["decode caches"] = max(out.get("decode caches", 0), cache_bytes(cache))
    out["decode"] = counter.peak
    return out


def size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def tiles(width: int, height: int, tile: int) -> int:
    return len(Tiler(tile, 1.0, False).spans(height)) * len(Tiler(tile, 1.0, False).spans(width))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="720p,1080p,4K", help=f"names from {', '.join(TARGETS)} or WxH")
    ap.add_argument("--chunk", type=int, default=4, help="frames per streaming chunk")
    ap.add_argument("--fit", default="64x48,128x80,192x112", help="WxH sizes to measure (multiples of 8)")
    ap.add_argument("--tile", type=int, default=512, help="tile side in pixels for the tiled rows (0: none)")
    ap.add_argument("--width", type=int, default=128, help="hidden_size (128 = released)")
    ap.add_argument("--variants", default="plain,levers")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = CausalVAE(CausalVAEConfig(hidden_size=args.width, norm="frame")).eval()
    weights = sum(p.numel() for p in model.parameters())
    print(f"# torch {torch.__version__}; float32 on the CPU; chunk {args.chunk}; hidden_size {args.width}; "
          f"weights {weights / 1e6:.0f} M parameters ({weights * 2 / 2**30:.2f} GiB in bf16)")
    targets = {name: TARGETS[name] if name in TARGETS else size(name) for name in args.targets.split(",")}
    frames = {name: (w, h) for name, (w, h) in targets.items()}
    if args.tile:
        frames["tile"] = (args.tile, args.tile)
    fits = [size(s) for s in args.fit.split(",")]
    print(f"{'variant':<8}{'at':>7}{'fit':>10}{'enc B/px':>10}{'caches':>8}{'dec B/px':>10}{'caches':>8}")
    lines: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for variant in args.variants.split(","):
        for name, (tw, th) in frames.items():
            if variant == "plain" and name != next(iter(frames)):
                lines[variant, name] = lines[variant, next(iter(frames))]  # plain: no slices, one line serves all
                continue
            points = []
            for w, h in fits:
                scaled = round(Levers.slice_elements * w * h / (tw * th))
                model.use_levers(Levers.off() if variant == "plain" else Levers(slice_elements=max(1, scaled)))
                m = measure(model, w, h, args.chunk)
                points.append((w * h, m))
                print(f"{variant:<8}{name:>7}{w:>5}x{h:<4}" + "".join(
                    f"{m[k] / (w * h):10.0f}{m[k + ' caches'] / (w * h):8.0f}" for k in ("encode", "decode")), flush=True)
            px = np.array([p for p, _ in points], dtype=float)
            fit = {}
            for k in ("encode", "decode", "encode caches", "decode caches"):
                ys = np.array([m[k] for _, m in points], dtype=float)
                slope, intercept = np.polyfit(px, ys, 1)
                fit[k] = (slope, intercept, float(np.max(np.abs(slope * px + intercept - ys) / ys)))
            lines[variant, name] = fit
    gib = lambda b: b / 2**31  # float32 bytes -> GiB in bf16
    print(f"\npredicted peaks, bf16 activations (GiB; + {weights * 2 / 2**30:.2f} GiB bf16 weights), "
          f"worst fit error in brackets")
    for name, (w, h) in targets.items():
        for variant in args.variants.split(","):
            row = []
            for k in ("encode", "decode"):
                slope, intercept, err = lines[variant, name][k]
                cache_slope = lines[variant, name][k + " caches"][0]
                row.append(f"{k} {gib(slope * w * h + intercept):6.2f} (caches {gib(cache_slope * w * h):5.2f}) [{err:.1%}]")
                if args.tile and w * h > args.tile ** 2:
                    tslope, tintercept, _ = lines[variant, "tile"][k]
                    tcache = lines[variant, "tile"][k + " caches"][0] * args.tile ** 2
                    n = tiles(w, h, args.tile)
                    row.append(f"tiled {gib(tslope * args.tile ** 2 + tintercept + (n - 1) * tcache):6.2f} ({n} tiles)")
            print(f"{name:>6} {variant:<7}" + "   ".join(row))


if __name__ == "__main__":
    main()
