"""Peak memory of streaming encode and decode, counted exactly on the CPU and extrapolated by size.

    python benchmarks/memory.py --size 1280x720 --chunk 4 --fit 160x96,320x176,480x272

`LiveTensorBytes` adds up every tensor alive at once, op by op, so it needs no GPU and no timing.
It sees the model's own tensors (activations, causal caches, inputs and outputs): backend scratch
(cuDNN / oneDNN workspaces) and allocator slack come on top, so a GPU's `max_memory_allocated`
reads somewhat higher. Activations grow with the pixel count and nothing else, so runs at small
frame sizes, fitted by a line, predict a large one (the third fit size checks the line). The fit
runs in float32; bf16 halves the activations. Weights are reported apart (v1.0.0: 229 M parameters).
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
from cvae_cli.model import CausalVAE, CausalVAEConfig  # noqa: E402
from cvae_cli.stream import StreamOptions, decode_latents, encode_frames  # noqa: E402


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


def peaks(model: CausalVAE, width: int, height: int, chunk: int) -> tuple[int, int]:
    """Peak live bytes (encode, decode) streaming 1 + 3*chunk frames: the first chunk, a steady one
    and the last (decode flushes the frame it held back there)."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(1 + 3 * chunk)]
    opts = StreamOptions(chunk=chunk)
    with LiveTensorBytes() as enc:
        for _ in encode_frames(model, iter(frames), opts):
            pass
    del frames
    z = torch.randn(model.config.embed_dim, 1 + 3 * chunk // 4, height // 8, width // 8)
    with LiveTensorBytes() as dec:
        for _ in decode_latents(model, [z], opts, height, width):
            pass
    return enc.peak, dec.peak


def size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1280x720", type=size, help="WxH to predict")
    ap.add_argument("--chunk", type=int, default=4, help="frames per streaming chunk")
    ap.add_argument("--fit", default="160x96,320x176,480x272", help="WxH sizes to measure (multiples of 16)")
    ap.add_argument("--width", type=int, default=128, help="hidden_size (128 = released)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = CausalVAE(CausalVAEConfig(hidden_size=args.width, norm="frame")).eval()
    weights = sum(p.numel() for p in model.parameters())
    print(f"# torch {torch.__version__}; float32 on the CPU; chunk {args.chunk}; hidden_size {args.width}; "
          f"weights {weights / 1e6:.0f} M parameters ({weights * 2 / 2**30:.2f} GiB in bf16)")
    print(f"{'size':>10}{'pixels':>10}{'encode GiB':>12}{'decode GiB':>12}")
    points = []
    for w, h in map(size, args.fit.split(",")):
        enc, dec = peaks(model, w, h, args.chunk)
        points.append((w * h, enc, dec))
        print(f"{w}x{h:<6}{w * h:>10}{enc / 2**30:12.3f}{dec / 2**30:12.3f}", flush=True)
    px = np.array([p[0] for p in points], dtype=float)
    w, h = args.size
    for name, column in (("encode", 1), ("decode", 2)):
        ys = np.array([p[column] for p in points], dtype=float)
        slope, intercept = np.polyfit(px, ys, 1)
        worst = np.max(np.abs(slope * px + intercept - ys) / ys)
        fp32 = slope * w * h + intercept
        print(f"{name} at {w}x{h}: {slope:.0f} bytes/pixel (fit within {worst:.1%}) -> activations "
              f"{fp32 / 2**30:.2f} GiB in float32, {fp32 / 2**31:.2f} GiB in bf16 "
              f"(+{weights * 2 / 2**30:.2f} GiB bf16 weights)")


if __name__ == "__main__":
    main()
