"""The built-in model's look, measured: error along each edge against the interior, and which source
frame each reconstructed frame matches best (time offset -2..+2).

    python benchmarks/look.py [--clip examples/cockatoo.mp4] [--weights weights/cvae-small.safetensors]

Runs each model the way `cvae reconstruct` does (streamed chunks, edges repeated to multiples of 8,
fp32 on the CPU) but keeps the frames in memory, before any H.264 coding. Models:
- the built-in small model, against the source;
- the model's fixed temporal resampling alone, on a ramp of frame indices: the time alignment the
  architecture gives before any weights (`--lag-only` prints just this);
- the built-in model and a random SD VAE (SD's layout at a narrow width, GroupNorm affines
  perturbed, tail-inflated) on a flat grey photo: any structure at the edges then comes from the
  layers' padding, not from the picture.
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


def resampling_lag(model, frames: int) -> list[float]:
    """Source time each output frame shows through the model's fixed temporal resampling alone (a
    ramp of frame indices down through the encoder's and up through the decoder's resampling
    layers), minus its own index: the architecture's time alignment, free of any weights."""
    from cvae_cli.model.layers import TimeDownsample2x, TimeUpsample2x

    downs = [m for m in model.encoder.modules() if isinstance(m, TimeDownsample2x)]
    ups = [m for m in model.decoder.modules() if isinstance(m, TimeUpsample2x)]
    x = torch.arange(frames, dtype=torch.float64).view(1, 1, frames, 1, 1)
    for layer in downs + ups:
        x = layer(x)
    return [float(v) - t for t, v in enumerate(x.flatten()[:frames])]


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
    ap.add_argument("--lag-only", action="store_true", help="only the resampling's time alignment (instant)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    args.work.mkdir(parents=True, exist_ok=True)
    frames = list(media.read_frames(args.clip))
    src = np.stack(frames)
    print(f"{args.clip.name}: {len(frames)} frames of {src.shape[2]}x{src.shape[1]}")

    small = load_model(args.weights).eval()
    lag = resampling_lag(small, len(frames))
    print("time shown minus own index, through the fixed temporal resampling alone:",
          " ".join(f"{v:+.2f}" for v in lag))
    if args.lag_only:
        return
    report("built-in small model, against the source", run(small, frames), src)

    # Flat grey in: whatever structure comes out along the edges is the layers' own doing (zero
    # padding, the right/bottom-only padding of SD's stride-2 downsampling), not the picture's.
    from cvae_cli.inflate import inflate

    sd = random_sd_vae(args.work / "random-sd.safetensors", args.sd_width)
    torch.manual_seed(0)
    still = inflate(sd, init="tail", arch=type(small.config).from_dict(
        {**small.config.to_dict(), "encoder_temporal_downsample": [""] * 4, "decoder_temporal_upsample": [""] * 4}))
    grey = [np.full_like(frames[0], 128)]
    print("\nflat grey photo in: mean |output - the output's interior mean| per band, 0-255")
    print("| model | " + " | ".join(bands(src)) + " |\n|---|" + "---|" * len(bands(src)))
    for name, model in (("built-in small model", small), ("random SD VAE", still.eval())):
        flat = run(model, grey).astype(np.float64)
        centre = bands(flat)["interior"].mean((0, 1, 2))
        print(f"| {name} | " + " | ".join(f"{np.abs(x - centre).mean():.2f}" for x in bands(flat).values()) + " |")
    try:  # the same random SD VAE through diffusers' own AutoencoderKL: the original code
        from diffusers import AutoencoderKL
        from safetensors.torch import load_file
    except ImportError:
        return
    w = args.sd_width
    ref = AutoencoderKL(block_out_channels=(w, 2 * w, 2 * w, 2 * w), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        norm_num_groups=32).eval()
    ref.load_state_dict(load_file(sd))
    x = torch.from_numpy(grey[0]).permute(2, 0, 1).float().div(127.5).sub(1)[None]
    y = ref.decode(ref.encode(x).latent_dist.mode()).sample[0].clamp(-1, 1).add(1).mul(127.5).round()
    y = y.byte().permute(1, 2, 0).numpy()[None].astype(np.float64)
    centre = bands(y)["interior"].mean((0, 1, 2))
    print("| random SD VAE, diffusers' AutoencoderKL | "
          + " | ".join(f"{np.abs(v - centre).mean():.2f}" for v in bands(y).values()) + " |")
    print(f"cvae against diffusers on it: largest difference {np.abs(run(still, grey) - y).max():.0f} of 255")


if __name__ == "__main__":
    main()
