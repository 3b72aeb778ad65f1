"""Datasets at scale (issue 18): `cvae encode --manifest` with `--shards` against a file a sample.

A manifest of short clips and photos made from real media (examples/cockatoo.mp4 cut into clips of
9 frames, examples/coffee.jpg and scikit-image's bundled photos), a tiny random model and small
buckets, so that what is measured is reading, writing and bookkeeping, not the model. Every run is
its own `python -m cvae_cli` process (peak RSS from wait4). Prints one JSON object.

    python benchmarks/dataset_scale.py                       # 500 and 2,000 samples, a few minutes idle
    python benchmarks/dataset_scale.py --sizes 2000 --kinds shards --skip-parts resume,alone --work /tmp/ds

Measured:
- samples/s and files created, --shards against per-file output, at each size (interleaved);
- peak RSS at each size (it must not grow with the dataset);
- a --shards run killed (SIGKILL) half-way (10 of 20 shards finished) and run again: the re-run's
  time, and the samples it redoes, against the uninterrupted run;
- where the time goes: planning (a dry run: every row probed), a re-run with nothing to do, the
  frames alone (decode + resize + crop, no model), the model alone (the same batches of random
  frames), and what is left (latent files, shards, bookkeeping).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

CLIP, STRIDE = 9, 8  # cockatoo (41 frames): clips at 0, 8, 16, 24, 32
BUCKETS = "32x32,48x32,32x48"
PHOTOS = ["astronaut.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "coffee.png"]


def make_data(root: Path, samples: int) -> tuple[Path, dict]:
    """A manifest giving `samples` samples: three quarters clips (5 a video row), the rest photos."""
    import skimage

    root.mkdir(parents=True, exist_ok=True)
    media = {"cockatoo.mp4": REPO / "examples" / "cockatoo.mp4", "coffee.jpg": REPO / "examples" / "coffee.jpg"}
    media.update({name: Path(skimage.__file__).parent / "data" / name for name in PHOTOS})
    for name, src in media.items():
        if not (root / name).exists():
            (root / name).symlink_to(src)
    photos = [n for n in media if n != "cockatoo.mp4"]
    videos = round(samples * 0.75 / 5)
    rows = [{"path": "cockatoo.mp4", "output": f"v/{k:05d}", "caption": f"a cockatoo, take {k}"} for k in range(videos)]
    rows += [{"path": photos[k % len(photos)], "output": f"p/{k:05d}", "caption": f"photo {k}"}
             for k in range(samples - 5 * videos)]
    rows.sort(key=lambda r: r["caption"])  # clips and photos mixed
    manifest = root / f"m{samples}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, {"rows": len(rows), "video_rows": videos, "photo_rows": samples - 5 * videos}


def cvae(args: list, kill_when=None) -> dict:
    """Run `cvae ARGS` as a process: wall time, CPU time (user + system: what a shared machine's
    load changes least), peak RSS (MiB), exit status; SIGKILL it as soon as `kill_when()` is true."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CVAE_DEBUG": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cvae_cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_when is not None:
        while proc.poll() is None and not kill_when():
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, -9):
        raise SystemExit(f"cvae {' '.join(map(str, args))} failed:\n{err[-2000:]}")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "status": proc.returncode}


def files_under(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def frames_alone(manifest: Path) -> dict:
    """Decode, resample, resize and crop every sample's frames as a run does, without the model."""
    from cvae_cli import dataset, media
    from cvae_cli.samples import ClipReaders, Cutting, parse_buckets

    clips = dataset.read_manifest(manifest)
    cutting = Cutting(CLIP, STRIDE, parse_buckets(BUCKETS))
    t0 = time.perf_counter()
    plan = dataset.make_plan(clips, Path(tempfile.mkdtemp()), cutting=cutting)
    planned = time.perf_counter() - t0
    frames = 0
    t0, c0 = time.perf_counter(), time.process_time()
    with ClipReaders(plan.samples) as readers:
        for sample in plan.samples:
            opener = readers.opener(sample)
            with (opener() if callable(opener) else media.open_media(opener)) as source:
                frames += sum(1 for _ in sample.selection().frames(source))
    return {"plan_seconds": round(planned, 2), "seconds": round(time.perf_counter() - t0, 2),
            "cpu_seconds": round(time.process_time() - c0, 2), "frames": frames,
            "samples": len(plan.samples), "shapes": sorted({(s.bucket, s.start is None) for s in plan.samples})}


def model_alone(weights: Path, samples: int, batch: int) -> dict:
    """The same number of clips and photos through the model, `batch` at a time, from memory."""
    import numpy as np
    import torch

    from cvae_cli.checkpoints import load_model
    from cvae_cli.stream import StreamOptions, encode_batch

    torch.set_num_threads(1)
    model = load_model(weights, device="cpu")
    videos = round(samples * 0.75 / 5) * 5
    rng = np.random.default_rng(0)
    options = StreamOptions(chunk=4)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for count, length in ((videos, CLIP), (samples - videos, 1)):
            for k in range(0, count, batch):
                n = min(batch, count - k)
                clips = [[rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(length)] for _ in range(n)]
                for _ in encode_batch(model, [iter(c) for c in clips], options, [[0] for _ in range(n)]):
                    pass
    return {"seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="500,2000", help="dataset sizes in samples (comma-separated)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resume-size", type=int, default=None, help="samples of the killed-and-resumed run "
                                                                         "and the frames/model-alone parts "
                                                                         "(default: the first of --sizes)")
    parser.add_argument("--kinds", default="shards,files", help="outputs to time at each size: shards, files")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each output kind per size, interleaved")
    parser.add_argument("--skip-parts", default="", help="comma-separated: resume, alone")
    opts = parser.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",")]
    kinds = opts.kinds.split(",")
    skip = set(filter(None, opts.skip_parts.split(",")))
    work = opts.work or Path(tempfile.mkdtemp(prefix="cvae-dataset-scale-"))
    from conftest import random_model
    from cvae_cli.checkpoints import save_model

    weights = save_model(random_model(norm="frame"), work / "tiny.safetensors")
    report: dict = {"command": " ".join(sys.argv), "clip_frames": CLIP, "clip_stride": STRIDE, "buckets": BUCKETS,
                    "batch_size": opts.batch_size, "runs": {}}

    def common(manifest, out, *extra):
        return ["encode", "--manifest", manifest, "--out-dir", out, "-w", weights, "--device", "cpu", "--chunk", 4,
                "--clip-frames", CLIP, "--clip-stride", STRIDE, "--buckets", BUCKETS, "--batch-size", opts.batch_size,
                "--quiet", *extra]

    for n in sizes:
        manifest, shape = make_data(work / "data", n)
        report[f"manifest_{n}"] = shape
        for mode, extra in [(f"{m}{'' if r == 0 else f'_again{r}'}", e) for r in range(opts.repeat)
                            for m, e in (("shards", ["--shards"]), ("files", [])) if m in kinds]:
            out = work / f"out-{mode}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            run = cvae(common(manifest, out, *extra))
            summary = json.loads((out / "summary.json").read_text())
            assert summary["done"] == n, summary
            run.update(samples_per_s=round(n / run["seconds"], 2), samples_per_cpu_s=round(n / run["cpu_seconds"], 2),
                       files_created=files_under(out))
            report["runs"][f"{mode}_{n}"] = run
            print(mode, n, run, file=sys.stderr, flush=True)
        out = work / f"out-shards-{n}"
        run = cvae(common(manifest, out, "--shards"))  # complete: planning and listing only
        report["runs"][f"shards_{n}_rerun_complete"] = run
        run = cvae(common(manifest, out, "--shards", "--dry-run"))
        report["runs"][f"shards_{n}_dry_run"] = run

    n = opts.resume_size or sizes[0]
    manifest = work / "data" / f"m{n}.jsonl"
    if "resume" not in skip:  # killed half-way (by finished shards of n/20), then run again
        out = work / "out-resume"
        shutil.rmtree(out, ignore_errors=True)
        shard = max(1, n // 20)
        half = max(1, n // shard // 2)
        killed = cvae(common(manifest, out, "--shards", "--shard-size", shard),
                      kill_when=lambda: len(list(out.glob("shard-*.tar"))) >= half)
        finished = len(list(out.glob("shard-*.tar")))
        again = cvae(common(manifest, out, "--shards", "--shard-size", shard))
        summary = json.loads((out / "summary.json").read_text())
        keys = [json.loads(line)["key"] for line in (out / "index.jsonl").read_text().splitlines()]
        report["resume"] = {"killed_after_s": killed["seconds"], "shards_finished_when_killed": finished,
                            "rerun": again, "rerun_done": summary["done"], "rerun_skipped": summary["skipped"],
                            "every_sample_once": len(keys) == len(set(keys)) == n}
        print("resume", report["resume"], file=sys.stderr, flush=True)
    if "alone" not in skip:
        report["frames_alone"] = frames_alone(manifest)
        report["model_alone"] = model_alone(weights, n, opts.batch_size)
        print("alone", report["frames_alone"], report["model_alone"], file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
