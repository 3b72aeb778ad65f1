"""How far streaming and the released windowing are from whole-clip inference for clip-norm models.

    python benchmarks/fidelity.py --frames 97 --size 256 --chunks 4,8,16

Uses the narrow v1.0.0 / v1.1.0 reference models in the conformance fixtures (real Open-Sora-Plan
layouts, clip norm, random-but-fixed weights; the released 229 M checkpoints behave alike in kind)
on a camera pan over scikit-image's astronaut photo. Reports latent relative error against whole-clip
encoding, and the PSNR of each decode against the input and against the whole-clip decode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli.checkpoints import config_from_json  # noqa: E402
from cvae_cli.model import CausalVAE  # noqa: E402
from cvae_cli.stream import StreamOptions, decode_latents, encode_frames  # noqa: E402

FIXTURES = Path(os.environ.get("CVAE_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


def load(version: str) -> CausalVAE:
    f = safe_open(str(FIXTURES / f"osp-v{version}.safetensors"), "pt")
    model = CausalVAE(config_from_json(json.loads(f.metadata()["config"]))).eval()
    model.load_state_dict({k[6:]: f.get_tensor(k).float() for k in f.keys() if k.startswith("model.")})
    return model


def pan(frames: int, size: int) -> list[np.ndarray]:
    from skimage.data import astronaut
    img = astronaut()  # 512x512
    step = (img.shape[1] - size) / max(frames - 1, 1)
    return [np.ascontiguousarray(img[64:64 + size, round(t * step):round(t * step) + size]) for t in range(frames)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=97)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--chunks", default="4,8,16")
    args = ap.parse_args()
    frames = pan(args.frames, args.size)
    print(f"pan over astronaut, {args.frames} frames {args.size}x{args.size}; latent rel. error vs whole clip, "
          f"PSNR (dB) of the decode vs input and vs the whole-clip decode")
    print(f"{'model':<8}{'mode':<12}{'latent rel err':>15}{'PSNR vs input':>15}{'PSNR vs whole':>15}")
    for version in ("1.0.0", "1.1.0"):
        model = load(version)
        results = {}
        variants = [("whole", StreamOptions(mode="whole")), ("window", StreamOptions(mode="window"))]
        variants += [(f"stream c{c}", StreamOptions(chunk=c)) for c in map(int, args.chunks.split(","))]
        for name, opts in variants:
            z = torch.cat([m for m, _ in encode_frames(model, frames, opts)], 1)
            out = np.concatenate(list(decode_latents(model, [z], opts, args.size, args.size)))[:args.frames]
            results[name] = z, out
            zw, ow = results["whole"]
            err = ((z - zw).norm() / zw.norm()).item()
            print(f"v{version:<7}{name:<12}{err:15.2e}{psnr(out, np.stack(frames)):15.2f}{psnr(out, ow):15.2f}", flush=True)


if __name__ == "__main__":
    main()
