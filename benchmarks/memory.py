"""Peak memory of streaming encode and decode, counted exactly at the real frame size.

    python benchmarks/memory.py --targets 720p,1080p,4K --chunk 4 --tile 512          # seconds
    python benchmarks/memory.py --device cpu --dtype float32 --targets 64x48 --width 32 # the same count, computed

`LiveTensorBytes` adds up every tensor alive at once, op by op. By default the model runs on the
meta device: shapes only, no arithmetic and no memory, while every op still makes its outputs as it
would on a real device, so a 4K count takes seconds and does not depend on how busy the machine is.
On the CPU (`--device cpu`) the same count gives the same bytes (tests/test_levers.py checks it).
It sees the model's own tensors (activations, causal caches, inputs and outputs): backend scratch
(cuDNN / oneDNN workspaces, copies made inside a kernel) and allocator slack come on top, so a GPU's
`max_memory_allocated` reads somewhat higher. Weights are not counted (v1.0.0: 229 M parameters,
0.43 GiB in bf16).

Steps run as `stream` runs them: encode chunks of 1 + c, c, c frames; decode one latent a step
(chunk 4), then the empty step that flushes; a photo is one frame through encode, then decode.
`--tile` cuts every frame into `stream.Tiler`'s overlapping tiles, each with its own caches, for
frames larger than one tile. Rows: the plain path (`Levers.off()`) and the levers (`Levers()`).
"""
from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli.model import CausalVAE, CausalVAEConfig, Levers  # noqa: E402
from cvae_cli.stream import AUTO_TILE, TILE_ABOVE, Tiler  # noqa: E402

TARGETS = {"720p": (1280, 720), "1080p": (1920, 1088), "4K": (3840, 2160)}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once, counted exactly: every op's outputs are tracked
    until the last tensor viewing their storage is garbage. Tensors made before entering (the
    weights) are not counted. Any device, the meta device included (storages are told apart by
    identity, not by address: meta storages have none). `at_peak` names the op that made the peak
    and the shapes of the largest storages alive then."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.shapes: dict[int, tuple] = {}
        self.live = self.peak = 0
        self.at_peak: tuple[str, list[tuple[int, tuple]]] = ("", [])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.refs:
                    self.refs[key], self.sizes[key], self.shapes[key] = 0, storage.nbytes(), tuple(t.shape)
                    self.live += self.sizes[key]
                    if self.live > self.peak:
                        self.peak = self.live
                        self.at_peak = (str(func), sorted(((self.sizes[k], self.shapes[k]) for k in self.sizes),
                                                          key=lambda s: -s[0])[:8])
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key)
        return out

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key], self.shapes[key]


def cache_bytes(tiler: Tiler) -> int:
    """Bytes of every causal cache that the tiles (or the one whole frame) keep between steps."""
    def leaves(v):
        return [t for x in v for t in leaves(x)] if isinstance(v, tuple) else [v] if isinstance(v, torch.Tensor) else []
    return sum(t.numel() * t.element_size() for c in tiler.caches.values() for v in c.state.values() for t in leaves(v))


@torch.inference_mode()
def measure(model: CausalVAE, width: int, height: int, chunk: int = 4, tile: int | None = None,
            explain: bool = False) -> dict:
    """Peak live bytes streaming 1 + 3*chunk frames (encode) and their latents (decode), and of a
    photo (one frame, encode then decode), with the largest total of caches kept between steps;
    on the model's device and dtype. With `explain`, also what was alive at each peak."""
    p = next(model.parameters())
    fs, ft = model.config.space_compression, model.config.time_compression
    x = torch.zeros(1, 3, 1 + 3 * chunk, height, width, device=p.device, dtype=p.dtype)
    z = torch.zeros(1, model.config.embed_dim, 1 + 3 * chunk // ft, height // fs, width // fs,
                    device=p.device, dtype=p.dtype)
    encode = lambda piece, cache: model.encode(piece, cache).mean
    decode = lambda piece, cache: model.decode(piece, cache)
    out: dict = {"encode caches": 0, "decode caches": 0}
    cuts = [0, 1 + chunk, 1 + 2 * chunk, 1 + 3 * chunk]
    tiler = Tiler(tile, 1 / fs, streaming=True)
    with LiveTensorBytes() as counter:
        for i in range(3):
            tiler.run(encode, x[:, :, cuts[i]:cuts[i + 1]], final=i == 2)
            out["encode caches"] = max(out["encode caches"], cache_bytes(tiler))
    out["encode"], out["encode at"] = counter.peak, counter.at_peak
    tiler = Tiler(tile and tile // fs, fs, streaming=True)
    with LiveTensorBytes() as counter:
        for i in range(z.shape[2] + 1):  # one latent a step (chunk 4), then the flush (T = 0)
            tiler.run(decode, z[:, :, i:i + 1], final=i == z.shape[2])
            out["decode caches"] = max(out["decode caches"], cache_bytes(tiler))
    out["decode"], out["decode at"] = counter.peak, counter.at_peak
    with LiveTensorBytes() as counter:
        latent = Tiler(tile, 1 / fs, streaming=True).run(encode, x[:, :, :1], final=True)
        Tiler(tile and tile // fs, fs, streaming=True).run(decode, latent, final=True)
    out["photo"], out["photo at"] = counter.peak, counter.at_peak
    return out


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
    args = ap.parse_args(argv)

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
