"""The built-in model's look, measured: error along each edge against the interior, and which source
frame each reconstructed frame matches best (time offset -2..+2).

    python benchmarks/look.py [--clip examples/cockatoo.mp4] [--weights weights/cvae-small.safetensors]

Runs each model the way `cvae reconstruct` does (streamed chunks, edges repeated to multiples of 8,
fp32 on the CPU) but keeps the frames in memory, before any H.264 coding. Models:
- the built-in small model, against the source;
- a random SD VAE (SD's layout at a narrow width, GroupNorm affines perturbed), tail-inflated into
  the built-in model's video layout, against the same SD VAE run frame by frame (what tail inflation
  equals on a still): what the architecture alone does to edges and to time;
- that random SD VAE on a flat grey clip: any structure at the edges then comes from the layers' padding.
Prints markdown tables (benchmarks/README.md quotes them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cvae_cli import media  # noqa: E402
from cvae_cli.checkpoints import load_model  # noqa: E402
from cvae_cli.stream import StreamOptions, decode_latents, encode_frames  # noqa: E402

BAND = 2  # pixels along each edge
INTERIOR = 16  # the interior starts this far from every edge
OFFSETS = range(-2, 3)


def run(model, frames: list[np.ndarray], chunk: int = 8) -> np.ndarray:
    """uint8 (T, H, W, 3) through the model as `cvae reconstruct` streams it."""
    h, w = frames[0].shape[:2]
    options = StreamOptions(mode="stream", chunk=chunk)
    latents = [mean for mean, _ in encode_frames(model, iter(frames), options)]
    out = np.concatenate(list(decode_latents(model, iter(latents), options, h, w)))
    return out[: len(frames)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def bands(x: np.ndarray) -> dict[str, np.ndarray]:
    """(T, H, W, C) -> the pixels of each edge band and of the interior."""
    return {"left": x[:, :, :BAND], "right": x[:, :, -BAND:], "top": x[:, :BAND], "bottom": x[:, -BAND:],
            "interior": x[:, INTERIOR:-INTERIOR, INTERIOR:-INTERIOR]}


def edges(recon: np.ndarray, ref: np.ndarray) -> dict[str, tuple[float, tuple[float, float, float]]]:
    """Per band: PSNR, and the mean signed error of R, G, B (a tint shows as one channel's bias)."""
    out = {}
    for (name, a), b in zip(bands(recon).items(), bands(ref).values()):
        bias = (a.astype(np.float64) - b.astype(np.float64)).reshape(-1, 3).mean(0)
        out[name] = (psnr(a, b), tuple(float(v) for v in bias))
    return out


def offsets(recon: np.ndarray, ref: np.ndarray) -> list[int]:
    """For each reconstructed frame t, the d in -2..2 whose reference frame t + d it matches best."""
    best = []
    for t in range(len(recon)):
        scores = {d: psnr(recon[t], ref[t + d]) for d in OFFSETS if 0 <= t + d < len(ref)}
        best.append(max(scores, key=scores.get))
    return best


def random_sd_vae(path: Path, width: int, seed: int = 0) -> Path:
    """SD's AutoencoderKL layout (4 levels, 2 resnets each, 4 latent channels) at a narrow width."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(width, 2 * width, 2 * width, 2 * width),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, latent_channels=4, norm_num_groups=32)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path


def report(name: str, recon: np.ndarray, ref: np.ndarray) -> None:
    e = edges(recon, ref)
    inner = e["interior"][0]
    print(f"\n{name}: whole {psnr(recon, ref):.2f} dB")
    print("| band | PSNR dB | vs interior | mean error R, G, B (0-255) |\n|---|---|---|---|")
    for band, (p, bias) in e.items():
        print(f"| {band} | {p:.2f} | {p - inner:+.2f} | {', '.join(f'{v:+.2f}' for v in bias)} |")
    best = offsets(recon, ref)
    counts = {d: best.count(d) for d in OFFSETS}
    print("best offset per frame:", " ".join(f"{d:+d}" for d in best))
    print("frames per offset:", ", ".join(f"{d:+d}: {n}" for d, n in counts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=Path, default=REPO / "examples" / "cockatoo.mp4")
    ap.add_argument("--weights", type=Path, default=REPO / "weights" / "cvae-small.safetensors")
    ap.add_argument("--sd-width", type=int, default=32, help="channels of the random SD VAE's first level")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cvae-look"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    args.work.mkdir(parents=True, exist_ok=True)
    frames = list(media.read_frames(args.clip))
    src = np.stack(frames)
    print(f"{args.clip.name}: {len(frames)} frames of {src.shape[2]}x{src.shape[1]}")

    small = load_model(args.weights).eval()
    report("built-in small model, against the source", run(small, frames), src)

    from cvae_cli.inflate import inflate

    sd = random_sd_vae(args.work / "random-sd.safetensors", args.sd_width)
    layout = small.config.to_dict()
    torch.manual_seed(0)
    video = inflate(sd, init="tail", arch=type(small.config).from_dict(layout)).eval()
    still = inflate(sd, init="tail", arch=type(small.config).from_dict(
        {**layout, "encoder_temporal_downsample": [""] * 4, "decoder_temporal_upsample": [""] * 4})).eval()
    per_frame = run(still, frames)
    report("random SD VAE, tail-inflated, against the same SD VAE frame by frame", run(video, frames), per_frame)
    report("random SD VAE frame by frame, against the source", per_frame, src)
    grey = [np.full_like(frames[0], 128) for _ in frames[:9]]
    flat = run(still, grey)
    print("\nrandom SD VAE on a flat grey clip: mean |output - interior mean| per band")
    centre = bands(flat)["interior"].astype(np.float64).mean((0, 1, 2))
    for band, x in bands(flat).items():
        print(f"| {band} | {np.abs(x.astype(np.float64) - centre).mean():.2f} |")


if __name__ == "__main__":
    main()
