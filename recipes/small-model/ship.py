"""Write the shipped model: stage 2's tail run in fp16, with where it came from in its metadata.

    python recipes/small-model/ship.py RUNS_DIR [--scores benchmarks/quality.csv] [-o weights/cvae-small.safetensors]

The held-out scores come from `evaluate.py`'s quality.csv (run it first); paths on the machine that
trained it are left out of the metadata, which names the recipe and the data packages instead.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from cvae_cli.checkpoints import load_model, provenance, save_model, set_provenance  # noqa: E402

SHIPPED = "tail, fine-tuned"
KEEP = ("init", "trained_steps", "train_seed", "train_data", "train_loss", "val_psnr", "val_ssim")


def held_out_scores(path: Path) -> dict[str, str]:
    scores = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["model"] == SHIPPED:
                scores[f"held_out {row['set']}"] = f"PSNR {row['psnr']} dB, SSIM {row['ssim']}, {row['frames']} frames"
    if not scores:
        raise SystemExit(f"{path} has no rows for {SHIPPED!r}: run evaluate.py first")
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--scores", type=Path, default=HERE.parents[1] / "benchmarks" / "quality.csv")
    ap.add_argument("-o", "--output", type=Path, default=HERE.parents[1] / "weights" / "cvae-small.safetensors")
    args = ap.parse_args()
    final = args.runs / "stage2-tail" / "final.safetensors"
    model = load_model(final).half()  # saved with the identity of the fp16 weights as they will be read back
    set_provenance(model, {k: v for k, v in provenance(model).items() if k in KEEP}, replace=True)
    save_model(model, args.output, name="cvae-small", source="recipes/small-model (stage 1 image VAE, inflated)",
               recipe="recipes/small-model/train.sh: stage 1 image VAE 7000 steps, stage 2 tail 800 steps",
               data="real photos and clips from Debian and PyPI packages (recipes/small-model/fetch_data.py); "
                    "evaluated on other packages", license="same as cvae (the data's licences are in "
                    "recipes/small-model/README.md)",
               **(held_out_scores(args.scores) if args.scores.exists() else {}))
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
