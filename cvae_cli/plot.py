"""Loss curves of training runs, from their loss.csv: one run's `loss.png`, or several runs overlaid
(`cvae plot`; the report's tail-vs-center figure is one call). matplotlib is an optional extra.

`train` writes loss.csv and imports this module to read and draw it; nothing here imports `train`."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from .atomic import atomic_path
from .errors import CvaeError


LOSS_CSV = "loss.csv"


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a loss.csv, as strings."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        raise CvaeError(f"cannot read {path}: {e.strerror or e}") from None


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CvaeError("plots need matplotlib: pip install 'cvae-cli[train]' (or pip install matplotlib)") from None
    return plt


def run_curves(run: Path, column: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one column of a run's loss.csv, skipping rows where it is empty."""
    path = Path(run) / LOSS_CSV if Path(run).is_dir() else Path(run)
    if not path.exists():
        raise CvaeError(f"{run} has no {LOSS_CSV}: is it a `cvae train --out` folder?")
    rows = read_rows(path)
    if rows and column not in rows[0]:
        raise CvaeError(f"{path} has no column {column!r} (it has {', '.join(rows[0])})")
    points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: Sequence[Path], output: Path, columns: Sequence[str] = ("loss", "val_psnr"),
              labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """One panel per column (those no run has are left out), one line per run; written atomically."""
    plt = _pyplot()
    labels = list(labels) if labels else [Path(r).name or str(r) for r in runs]
    if len(labels) != len(runs):
        raise CvaeError(f"{len(labels)} labels for {len(runs)} runs")
    curves = {c: [(label, *run_curves(r, c)) for r, label in zip(runs, labels)] for c in columns}
    curves = {c: lines for c, lines in curves.items() if any(steps for _, steps, _ in lines)}
    if not curves:
        raise CvaeError(f"no run has values for {', '.join(columns)} yet")
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (column, lines) in zip(axes[0], curves.items()):
        for label, steps, values in lines:
            if steps:
                ax.plot(steps, values, label=label, linewidth=1.2, marker="o" if len(steps) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(column)
        if column in ("loss", "l1", "kl", "lpips") and all(v > 0 for _, _, vs in lines for v in vs):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=110, format=output.suffix.lstrip(".") or "png")
    plt.close(fig)
    return output
