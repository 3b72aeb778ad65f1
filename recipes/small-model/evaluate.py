"""Score the recipe's models on the held-out media (packages never trained on), and time the shipped one.

    python recipes/small-model/evaluate.py DATA_DIR RUNS_DIR [--out benchmarks/]

Writes to --out: quality.csv (model, set, frames, PSNR, SSIM), error-over-time.csv and .png (per-frame
PSNR over the longest held-out clip: the report's "error accumulation"), and speed.csv (the shipped
model on this CPU); prints the markdown tables benchmarks/README.md quotes. Every model runs through
`cvae reconstruct`'s own code path (streaming, fp32 on the CPU), so the numbers are what a user gets.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from cvae_cli import media  # noqa: E402
from cvae_cli.checkpoints import load_model  # noqa: E402
from cvae_cli.inflate import inflate  # noqa: E402
from cvae_cli.tokenizer import Selection, reconstruct_file  # noqa: E402
from cvae_cli.stream import StreamOptions, auto_cut  # noqa: E402
from cvae_cli.train import read_config  # noqa: E402

SETS = {"photos, long side 256": ("eval-photos.txt", 256), "photos, long side 512": ("eval-photos.txt", 512),
        "clips, long side 256, all frames": ("eval-clips.txt", 256)}
LONG_CLIP = "cockatoo.mp4"  # 280 frames, one handheld shot


def models(runs: Path) -> dict[str, torch.nn.Module]:
    sd = runs / "stage1-image" / "final-sd-vae.safetensors"
    layout = read_config(str(HERE / "video-vae.json"))
    out = {"stage 1 image VAE": load_model(runs / "stage1-image" / "final.safetensors")}
    for init in ("tail", "center"):
        torch.manual_seed(0)
        out[f"{init}, inflated (no fine-tuning)"] = inflate(sd, init=init, arch=layout).eval()
    for init in ("tail", "center"):
        out[f"{init}, fine-tuned"] = load_model(runs / f"stage2-{init}" / "final.safetensors")
    return out


def reconstruct(model, src: Path, long_side: int, tmp: Path):
    info = media.probe(src)
    select = Selection(max_side=long_side)
    width, height = select.resize(info) or (info.width, info.height)
    chunk, tile = auto_cut(width, height)
    options = StreamOptions(mode="stream", chunk=chunk, tile=tile)
    dst = tmp / ("out.png" if info.is_image else "out.mp4")
    return reconstruct_file(model, src, dst, options, select).metrics


def quality(named: dict, data: Path, tmp: Path):
    rows, per_frame = [], {}
    for name, model in named.items():
        for set_name, (manifest, side) in SETS.items():
            files = [data / line.strip() for line in (data / manifest).read_text().splitlines() if line.strip()]
            psnr, ssim = [], []
            for src in files:
                m = reconstruct(model, src, side, tmp)
                psnr += m.psnr
                ssim += m.ssim
                if src.name == LONG_CLIP:
                    per_frame[name] = m.psnr
            rows.append({"model": name, "set": set_name, "frames": len(psnr),
                         "psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim)})
            print(f"{name:32s} {set_name:34s} {rows[-1]['psnr']:6.2f} dB  {rows[-1]['ssim']:.4f}", flush=True)
    return rows, per_frame


def speed(model, data: Path, tmp: Path, repeats: int = 3):
    """Best of `repeats`: frames/s for a 33-frame 256x256 clip, seconds for a 512x512 photo."""
    clip = data / "eval" / "clips" / LONG_CLIP
    photo = next(p for p in (data / line.strip() for line in (data / "eval-photos.txt").read_text().splitlines())
                 if p.name.startswith("astronaut"))
    out = {}
    for label, src, select, n in (("clip 256x256, 33 frames", clip, Selection(end=33, size=(256, 256)), 33),
                                  ("photo 512x512", photo, Selection(size=(512, 512)), 1)):
        chunk, tile = auto_cut(*select.size)
        options = StreamOptions(mode="stream", chunk=chunk, tile=tile)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            reconstruct_file(model, src, tmp / ("o.mp4" if n > 1 else "o.png"), options, select)
            best = min(best, time.perf_counter() - t)
        out[label] = (n / best, best)
        print(f"speed {label}: {n / best:.2f} frames/s, {best:.2f} s", flush=True)
    return out


def plot_error(per_frame: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, values in per_frame.items():
        if name.startswith(("tail", "center")):
            ax.plot(range(len(values)), values, label=name, linewidth=1,
                    linestyle="-" if "fine-tuned" in name else "--")
    ax.set_xlabel(f"frame of {LONG_CLIP} (held out, 256x144)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("error over time: tail vs center initialization")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--out", type=Path, default=HERE.parents[1] / "benchmarks")
    ap.add_argument("--shipped", type=Path, default=None, help="the shipped weights (default: stage-2 tail)")
    ap.add_argument("--skip-quality", action="store_true", help="only time the shipped model")
    ap.add_argument("--skip-speed", action="store_true", help="only score (timing wants an idle CPU)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_quality:
            rows, per_frame = quality(models(args.runs), args.data, tmp)
            with open(args.out / "quality.csv", "w", newline="") as f:
                w = csv.DictWriter(f, ["model", "set", "frames", "psnr", "ssim"])
                w.writeheader()
                w.writerows({**r, "psnr": f"{r['psnr']:.3f}", "ssim": f"{r['ssim']:.4f}"} for r in rows)
            with open(args.out / "error-over-time.csv", "w", newline="") as f:
                names = [n for n in per_frame if n.startswith(("tail", "center"))]
                w = csv.writer(f)
                w.writerow(["frame", *names])
                for k in range(len(per_frame[names[0]])):
                    w.writerow([k, *(f"{per_frame[n][k]:.3f}" for n in names)])
            plot_error(per_frame, args.out / "error-over-time.png")
            print("\n| model | " + " | ".join(SETS) + " |\n|---|" + "---|" * len(SETS))
            for name in dict.fromkeys(r["model"] for r in rows):
                cells = [f"{r['psnr']:.2f} dB / {r['ssim']:.3f}" for r in rows if r["model"] == name]
                print(f"| {name} | " + " | ".join(cells) + " |")
        if args.skip_speed:
            return
        shipped = load_model(args.shipped or args.runs / "stage2-tail" / "final.safetensors")
        timing = speed(shipped, args.data, tmp)
        with open(args.out / "speed.json", "w") as f:
            json.dump({k: {"frames_per_s": v[0], "seconds": v[1]} for k, v in timing.items()}, f, indent=1)


if __name__ == "__main__":
    main()
