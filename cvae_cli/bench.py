"""`cvae bench`: how fast the model streams on this machine, and in how much memory.

For encode and decode: frames/s (median of timed repeats after a warm-up round), the peak memory
(the allocator's on a GPU, the resident set on the CPU; above the start of each run, plus the
weights), the exact count of the model's own tensors beside it, GFLOP per frame and the TFLOP/s
achieved. Variants (`VARIANTS`: the plain path and each speed option) run interleaved, round by
round, so a loaded machine slows them alike. Random weights of a named layout unless `weights`
names a file: nothing is downloaded. Frames are synthetic arrays (no video decoding is timed).
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .atomic import atomic_path
from .device import resolve
from .errors import CvaeError
from .model import CausalVAE, CausalVAEConfig, Levers, v1_1_0_config
from .stream import StreamOptions, decode_latents, encode_frames

LAYOUTS = {"v1.0.0": CausalVAEConfig, "v1.1.0": v1_1_0_config}
VARIANTS = {  # name: (the model's levers, on top of which `fast` adds cuDNN autotuning on CUDA)
    "plain": Levers.off(),  # what cvae computed before the exact levers
    "fold_start": Levers(phase_upsample=False, slice_elements=None),
    "phase_upsample": Levers(fold_start=False, slice_elements=None),
    "slices": Levers(fold_start=False, phase_upsample=False),
    "default": Levers(),  # what `cvae encode` / `decode` run
    "fast": Levers(fused_norm=True, cudnn_benchmark=True),  # --fast
    "compile": Levers(compile=True),  # --compile
}
COMPARE = ("plain", "default", "fast", "compile")


@dataclass(frozen=True)
class BenchOptions:
    weights: str | None = None
    config: str = "v1.0.0"
    width: int = 1280
    height: int = 720
    frames: int = 17
    chunk: int = 16
    dtype: str = "auto"
    device: str = "auto"
    variants: tuple[str, ...] = ("default",)
    repeat: int = 3
    hidden_size: int | None = None  # narrower than the layout's, for a CPU (benchmarks/bench.py --width)
    norm: str | None = None

    def __post_init__(self):
        if self.weights is None and self.config not in LAYOUTS:
            raise CvaeError(f"--config {self.config}: use one of {', '.join(LAYOUTS)}")
        if self.width < 8 or self.height < 8 or self.width % 8 or self.height % 8:
            raise CvaeError(f"--size {self.width}x{self.height}: width and height must be multiples of 8")
        if self.frames < 1 or (self.frames - 1) % 4:
            raise CvaeError(f"--frames {self.frames}: use 1 + 4k frames (1, 5, 9, 13, 17, ...)")
        if self.repeat < 1:
            raise CvaeError(f"--repeat {self.repeat}: at least 1")
        try:
            StreamOptions(chunk=self.chunk)
        except ValueError as e:
            raise CvaeError(f"--chunk {self.chunk}: {e}") from None
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise CvaeError(f"variant {', '.join(unknown) or '(none)'}: use {', '.join(VARIANTS)}")


@dataclass
class Record:
    """One direction of one variant: what `--json` writes, one record each."""

    direction: str  # encode or decode
    variant: str
    fps: float  # frames/s: input frames for encode, output frames for decode
    seconds: float  # the median run
    x: float  # speed relative to the first variant
    peak_gib: float | None  # measured: allocator (GPU) or resident set (CPU), plus the weights
    counted_gib: float | None  # exact count of the model's tensors plus the weights (None: count unavailable)
    gflop_per_frame: float
    tflops: float
    frames: int
    runs: list[float]


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CvaeError(f"--size {text}: expected WxH, e.g. 1280x720") from None
    return w, h


def frames_of(n: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """A smooth moving pattern (not noise: the model sees picture-like statistics)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return [(127.5 + 120 * np.stack([np.sin((x + 3 * t + seed) / 17), np.cos((y - 2 * t) / 23),
                                      np.sin((x + y + 5 * t) / 31)], -1)).astype(np.uint8) for t in range(n)]


def load(options: BenchOptions, device: torch.device, dtype: torch.dtype) -> CausalVAE:
    if options.weights is not None:
        from .checkpoints import load_model

        return load_model(options.weights, norm=options.norm, device=device, dtype=dtype)
    fields = {k: v for k, v in (("hidden_size", options.hidden_size), ("norm", options.norm)) if v is not None}
    torch.manual_seed(0)
    return CausalVAE(LAYOUTS[options.config](**fields)).eval().to(device, dtype)


def flops(config: CausalVAEConfig, levers: Levers, frames: int, height: int, width: int) -> tuple[int, int]:
    """(encode, decode) FLOPs of one clip, counted on the meta device: shapes only, no arithmetic."""
    with torch.device("meta"):
        model = CausalVAE(config).eval().use_levers(replace(levers, compile=False, fused_norm=False))
        x = torch.zeros(1, 3, frames, height, width)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        z = model.encode(x).mean
        encode = counter.get_total_flops()
        model.decode(z)
    return encode, counter.get_total_flops() - encode


def counted_peaks(config: CausalVAEConfig, levers: Levers, dtype: torch.dtype, width: int, height: int,
                  chunk: int, frames: int) -> tuple[int, int]:
    """The exact peak bytes (encode, decode) of the model's tensors streaming this clip, counted
    on the meta device (`budget.count`; weights not included)."""
    from .budget import count

    image = frames == 1
    counted = count(config, dtype, levers, "reconstruct", width, height, StreamOptions(chunk=chunk), image=image,
                    frames=frames)
    return counted.encode.peak, counted.decode.peak


class Peak:
    """Peak memory over a block, above what was in use at its start: the CUDA allocator's, or the
    resident set (Linux: the kernel's high-water mark, reset at the start) on the CPU; None where
    neither can be read."""

    def __init__(self, device: torch.device):
        self.cuda, self.value, self.before = device.type == "cuda", None, 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = _reset_rss_peak()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated() - self.before
        elif self.before is not None:
            high = _status_kib("VmHWM")
            self.value = None if high is None else max(0, high * 1024 - self.before)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> int | None:
    """Reset the resident set's high-water mark (Linux), returning the resident bytes now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def run(options: BenchOptions) -> list[Record]:
    """Time every variant, interleaved; one record per direction and variant."""
    device, dtype = resolve(options.device, options.dtype)
    base = load(options, device, dtype)
    w, h = options.width, options.height
    models = {}
    for name in options.variants:  # copy first: compiling changes a model in place
        levers = VARIANTS[name]
        models[name] = copy.deepcopy(base).use_levers(replace(levers, cudnn_benchmark=levers.cudnn_benchmark
                                                              and device.type == "cuda"))
    weights = sum(t.numel() * t.element_size() for t in (*base.parameters(), *base.buffers()))
    frames, opts = frames_of(options.frames, w, h), StreamOptions(chunk=options.chunk)
    with torch.inference_mode():
        z = torch.cat([m for m, _ in encode_frames(base, frames, opts)], 1)
    n_out = 1 + base.config.time_compression * (z.shape[1] - 1)
    times = {name: ([], []) for name in options.variants}
    peaks: dict[str, list] = {name: [None, None] for name in options.variants}
    for round_ in range(options.repeat + 1):  # round 0 warms up (kernel choice, compilation, autotuning)
        for name in options.variants:
            model = models[name]
            steps = (lambda: list(encode_frames(model, frames, opts)),
                     lambda: list(decode_latents(model, [z], opts, h, w)))
            for j, step in enumerate(steps):
                with torch.inference_mode(), Peak(device) as peak:
                    start = time.perf_counter()
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                if round_:
                    times[name][j].append(seconds)
                    if peak.value is not None:
                        peaks[name][j] = max(peaks[name][j] or 0, peak.value)
    records, first = [], {}
    for name in options.variants:
        levers = models[name].levers
        counted = counted_peaks(base.config, levers, dtype, w, h, options.chunk, options.frames)
        work = flops(base.config, levers, options.frames, h, w)
        for j, (direction, n) in enumerate((("encode", options.frames), ("decode", n_out))):
            seconds = statistics.median(times[name][j])
            first.setdefault(direction, seconds)
            records.append(Record(
                direction=direction, variant=name, fps=n / seconds, seconds=seconds,
                x=first[direction] / seconds,
                peak_gib=None if peaks[name][j] is None else (peaks[name][j] + weights) / 2**30,
                counted_gib=None if counted is None else (counted[j] + weights) / 2**30,
                gflop_per_frame=work[j] / n / 1e9, tflops=work[j] / seconds / 1e12, frames=n,
                runs=times[name][j]))
    return records


def describe(options: BenchOptions, device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    model = Path(options.weights).name if options.weights else f"{options.config} layout, random weights" + (
        f", hidden size {options.hidden_size}" if options.hidden_size else "")
    return (f"{name}; torch {torch.__version__}; {model}; {options.width}x{options.height} x {options.frames} "
            f"frames, chunk {options.chunk}, {str(dtype).removeprefix('torch.')}; median of {options.repeat} "
            f"interleaved runs after a warm-up")


def table(records: list[Record]) -> list[str]:
    """The records as aligned text lines, a header first."""
    gib = lambda v: "-" if v is None else f"{v:.2f}"
    lines = [f"{'direction':<10}{'variant':<16}{'frames/s':>9}{'x':>6}{'peak GiB':>10}{'counted':>9}"
             f"{'GFLOP/frame':>13}{'TFLOP/s':>9}"]
    for r in records:
        lines.append(f"{r.direction:<10}{r.variant:<16}{r.fps:9.2f}{r.x:6.2f}{gib(r.peak_gib):>10}"
                     f"{gib(r.counted_gib):>9}{r.gflop_per_frame:13.1f}{r.tflops:9.3f}")
    return lines


def as_json(records: list[Record], options: BenchOptions, device: torch.device, dtype: torch.dtype) -> dict:
    return dict(setup=describe(options, device, dtype), options=asdict(options),
                records=[asdict(r) for r in records])


def bench(options: BenchOptions, json_path: Path | None = None, say=print) -> list[Record]:
    """What `cvae bench` does: run, print the table (through `say`), write the JSON (all or nothing;
    an existing file is refused before anything runs, not written over)."""
    if json_path is not None and json_path.exists():
        raise CvaeError(f"--json {json_path}: the file exists; remove it or name another")
    if json_path is not None and not json_path.parent.is_dir():
        raise CvaeError(f"--json {json_path}: no folder {json_path.parent}")
    device, dtype = resolve(options.device, options.dtype)
    records = run(options)
    say("# " + describe(options, device, dtype))
    for line in table(records):
        say(line)
    if json_path is not None:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(as_json(records, options, device, dtype), indent=1) + "\n")
    return records
