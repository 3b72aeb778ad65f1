"""Resident memory of reconstructing one photo with the released-size model, as `cvae reconstruct` runs it.

    python benchmarks/photo_rss.py --size 3840x2160            # levers on (the default)
    python benchmarks/photo_rss.py --size 3840x2160 --plain    # Levers.off(): the path before them
    python benchmarks/photo_rss.py --command --size 6000x4000 --weights builtin --norm clip [--photo P]

`--command` measures the whole `cvae reconstruct` process instead (reading, the model, scoring,
writing): a real photo (default: libjxl-testdata's flower.png when given with --photo, else the
synthetic pattern) resized to the size, run as its own process; its peak resident set is that
process's own VmHWM, written by the child as it exits. (The parent's ru_maxrss for children would
not do: Linux carries the parent's high-water mark into a child across exec, and this parent holds
torch and, with --weights released, the model it saved.) `--weights released` makes (once, in --work) a random model of the released
v1.0.0 width and saves it, so the command loads it as a user's weights.

Random weights in the released v1.0.0 layout (229 M parameters, clip norm, float32 on the CPU), a
synthetic photo, chunk and tiles chosen by `stream.auto_cut` as the CLI does. Prints the process's
peak resident set (ru_maxrss) after encode and after decode, so the figure includes the weights,
the pixels, the latents and every allocator and oneDNN buffer, not only live tensors.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_cli.bench import frames_of  # noqa: E402
from cvae_cli.model import CausalVAE, CausalVAEConfig, Levers  # noqa: E402
from cvae_cli.stream import StreamOptions, auto_cut, decode_latents, encode_frames  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def whole_command(args, w: int, h: int) -> None:
    """Peak RSS of `cvae reconstruct` on one photo, as its own process."""
    import os
    import subprocess

    from PIL import Image

    from cvae_cli.checkpoints import builtin_weights, save_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    photo = work / f"photo-{w}x{h}.png"
    if not photo.exists():
        image = Image.open(args.photo).convert("RGB").resize((w, h), Image.LANCZOS) if args.photo \
            else Image.fromarray(frames_of(1, w, h)[0])
        image.save(photo)
    if args.weights == "builtin":
        weights = builtin_weights()
    elif args.weights == "released":
        weights = work / "released-v1.0.0-random.safetensors"
        if not weights.exists():
            torch.manual_seed(0)
            save_model(CausalVAE(CausalVAEConfig(hidden_size=128)).eval(), weights)  # v1.0.0 layout
    else:
        weights = Path(args.weights)
    hwm = work / f"vmhwm-{w}x{h}.txt"
    hwm.unlink(missing_ok=True)
    shim = ("import atexit, sys\n"
            f"atexit.register(lambda: open({str(hwm)!r}, 'w').write(next(line for line in open('/proc/self/status')"
            " if line.startswith('VmHWM'))))\n"
            "sys.argv[0] = 'cvae'\n"
            "from cvae_cli.cli import app\n"
            "app()\n")
    cmd = [sys.executable, "-c", shim, "reconstruct", str(photo), "-o", str(work / f"recon-{w}x{h}.png"),
           "--overwrite", "--weights", str(weights), *(["--norm", args.norm] if args.norm else []), *args.extra]
    print("#", " ".join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "CVAE_WEIGHTS": ""})
    peak = int(hwm.read_text().split()[1]) / 2**20 if hwm.exists() else float("nan")  # kB
    print(f"{w}x{h} weights {args.weights} norm {args.norm or 'as saved'}: exit {done.returncode}, "
          f"peak RSS {peak:.2f} GiB, {time.perf_counter() - start:.0f} s", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="3840x2160", help="WxH")
    ap.add_argument("--plain", action="store_true", help="Levers.off()")
    ap.add_argument("--width", type=int, default=128, help="hidden_size (128 = released)")
    ap.add_argument("--command", action="store_true", help="measure the whole `cvae reconstruct` process")
    ap.add_argument("--weights", default="builtin", help="--command: builtin, released (random, v1.0.0 width) "
                                                         "or a weights file")
    ap.add_argument("--norm", choices=("frame", "clip"), help="--command: override the model's norm")
    ap.add_argument("--photo", help="--command: a real photo to resize (default: a synthetic pattern)")
    ap.add_argument("--work", default="/tmp/cvae-photo-rss", help="--command: folder for photos and outputs")
    ap.add_argument("extra", nargs="*", help="--command: more options for cvae reconstruct (after --)")
    args = ap.parse_args(argv)
    w, h = map(int, args.size.lower().split("x"))
    if args.command:
        return whole_command(args, w, h)
    torch.manual_seed(0)
    model = CausalVAE(CausalVAEConfig(hidden_size=args.width)).eval()
    if args.plain:
        model.use_levers(Levers.off())
    chunk, tile = auto_cut(w, h)
    opts = StreamOptions(chunk=chunk, tile=tile)
    photo = frames_of(1, w, h)
    print(f"# {w}x{h}, tile {tile}, {'plain' if args.plain else 'levers'}; after loading: {peak_gib():.2f} GiB", flush=True)
    start = time.perf_counter()
    mean = torch.cat([m for m, _ in encode_frames(model, photo, opts)], 1)
    print(f"encode: peak RSS {peak_gib():.2f} GiB ({time.perf_counter() - start:.0f} s)", flush=True)
    frames = np.concatenate(list(decode_latents(model, [mean], opts, h, w)))
    assert frames.shape == (1, h, w, 3)
    print(f"decode: peak RSS {peak_gib():.2f} GiB ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
