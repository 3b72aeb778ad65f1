"""Training samples: random clips, crops and camera paths cut from real videos and photos.

Every sample is a pure function of (seed, index): the run is the same for a given seed and world
size whatever the number of DataLoader workers, and resuming at step s needs nothing but s. A step's
batch is all images (1 frame) or all clips (`frames` frames), decided per step, so batches stack.

    videos, photos -> `find_media` (survey: size, length, readable?) -> `SampleSpec` draws
    (source, start, scale, crop, camera path) -> uint8 frames -> float pixels in [-1, 1]
"""
from __future__ import annotations

import collections
import glob
import hashlib
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from . import media
from .errors import CvaeError

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".ogv", ".m4v", ".mpg", ".mpeg",
                            ".gif", ".flv", ".wmv", ".y4m", ".ts", ".m2ts", ".mts", ".vob", ".m2v"})
MANIFEST_SUFFIXES = frozenset({".txt", ".csv", ".jsonl", ".ndjson"})
_MAX_TRIES = 16  # sources tried for one sample before the run is declared out of readable data


@dataclass(frozen=True)
class Source:
    """One readable file: its size and (for a video) its length (`media.MediaInfo.frame_count`)."""

    path: Path
    width: int
    height: int
    frames: int  # 1 for a still
    is_image: bool

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)


@dataclass
class Survey:
    """What `--data` (or `--val`) holds: usable sources, and what was left out and why."""

    sources: list[Source]
    skipped: list[tuple[str, str]]  # (path, reason)

    @property
    def images(self) -> list[Source]:
        return [s for s in self.sources if s.is_image]

    @property
    def videos(self) -> list[Source]:
        return [s for s in self.sources if not s.is_image]

    def digest(self) -> str:
        """Identity of the data: paths, sizes and modification times (not contents: cheap)."""
        h = hashlib.sha256()
        for s in sorted(self.sources, key=lambda s: str(s.path)):
            st = s.path.stat()
            h.update(f"{s.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def list_files(entries: Sequence[str | os.PathLike]) -> list[Path]:
    """Media files named by folders (searched recursively by suffix), globs, single files, and the
    manifests `cvae encode --manifest` reads (.txt, .csv, .jsonl); duplicates dropped, order kept."""
    from .manifest import read_manifest

    found: list[Path] = []
    for entry in map(str, entries):
        path = Path(entry)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and _is_media_name(p))
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            found += [clip.path for clip in read_manifest(path)]
        elif path.exists():
            found.append(path)
        elif glob.has_magic(entry):
            matches = sorted(Path(m) for m in glob.glob(entry, recursive=True))
            if not matches:
                raise CvaeError(f"no file matches {entry}")
            found += [p for p in matches if p.is_file()]
        else:
            raise CvaeError(f"no such file or folder: {entry}")
    return list(dict.fromkeys(found))


def _is_media_name(p: Path) -> bool:
    suffix = p.suffix.lower()
    return suffix in media.IMAGE_SUFFIXES or suffix in VIDEO_SUFFIXES


def survey(entries: Sequence[str | os.PathLike], min_side: int) -> Survey:
    """Probe every file once: sources smaller than `min_side` on their short side (no crop fits)
    and unreadable ones are skipped, with the reason."""
    sources, skipped = [], []
    for path in list_files(entries):
        try:
            info = media.probe(path)
        except CvaeError as e:
            skipped.append((str(path), str(e)))
            continue
        if min(info.width, info.height) < min_side:
            skipped.append((str(path), f"{info.width}x{info.height} is smaller than the {min_side}-pixel crop"))
            continue
        frames = 1 if info.is_image else (info.frame_count or 0)
        sources.append(Source(path, info.width, info.height, frames, info.is_image))
    return Survey(sources, skipped)


@dataclass(frozen=True)
class SampleSpec:
    """How samples are drawn. Each field's metadata is its `cvae train` option (see `train.option`):
    the help text, and whether changing it makes another run."""

    frames: int | None = field(default=None, metadata={
        "help": "Frames per clip, 1 + 4k; 1 trains on single images. Default: 1 for an image model "
                "(--config image), 17 otherwise.", "identity": True})
    size: int = field(default=64, metadata={
        "help": "Side of the square crop in pixels, after a random rescale: the source is scaled so its short "
                "side is log-uniform between the crop and its own (never upscaled).", "identity": True})
    stride: int = field(default=1, metadata={"help": "Take every N-th frame of a video.", "min": 1,
                                             "identity": True})
    image_ratio: float = field(default=0.0, metadata={
        "help": "Share of steps trained on single images (joint image and video training).", "identity": True})
    photo_motion: float = field(default=0.0, metadata={
        "help": "Share of clips made as pans and zooms over photos (real pixels, made motion); every clip is "
                "one when no video is long enough.", "identity": True})

    @property
    def span(self) -> int:
        """Source frames one clip covers."""
        return (self.frames - 1) * self.stride + 1


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


class TrainingClips(torch.utils.data.Dataset):
    """Sample `index` of a run: a float tensor (3, T, size, size) in [-1, 1], plus the sources that
    failed on the way (a sample never fails: it draws another source, deterministically)."""

    def __init__(self, data: Survey, spec: SampleSpec, seed: int, global_batch: int):
        if spec.frames is None:
            raise ValueError("SampleSpec.frames is left to the model: resolve it before sampling")
        self.spec, self.seed, self.global_batch = spec, seed, global_batch
        self.images = data.sources  # any source gives a still: a photo, or one frame of a video
        self.clips = [s for s in data.videos if s.frames >= spec.span]
        self.photos = data.images if spec.photo_motion > 0 or not self.clips else []
        if spec.frames > 1 and spec.image_ratio < 1 and not (self.clips or self.photos):
            raise CvaeError(f"no video holds {spec.span} frames and there are no photos to move over: "
                            "add longer videos or photos, or lower --frames")

    def __len__(self) -> int:  # the sampler decides which indices run; any index is valid
        return 2**62

    def is_image_step(self, step: int) -> bool:
        return self.spec.frames == 1 or _rng(self.seed, step, 1).random() < self.spec.image_ratio

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        rng = _rng(self.seed, index, 0)
        image = self.is_image_step(index // self.global_batch)
        failures = []
        for _ in range(_MAX_TRIES):
            source, how = self._choose(rng, image)
            try:
                frames = how(source, rng)
            except CvaeError as e:
                failures.append((str(source.path), str(e)))
                continue
            pixels = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float().div_(127.5).sub_(1)
            return pixels, failures
        raise CvaeError(f"{_MAX_TRIES} sources in a row could not be read (last: {failures[-1][1]})")

    def _choose(self, rng: np.random.Generator, image: bool):
        if image:
            return self.images[rng.integers(len(self.images))], self._still
        if self.photos and (not self.clips or rng.random() < self.spec.photo_motion):
            return self.photos[rng.integers(len(self.photos))], self._camera_path
        return self.clips[rng.integers(len(self.clips))], self._video_clip

    # --- the three kinds of sample ---------------------------------------------------------------

    def _still(self, source: Source, rng: np.random.Generator) -> list[np.ndarray]:
        index = int(rng.integers(source.frames)) if source.frames > 1 else 0
        frame = _read(source, index, index + 1, rng)[0]
        box = self._crop_box(source, rng)
        return [_resample(frame, box, self.spec.size, flip=rng.random() < 0.5)]

    def _video_clip(self, source: Source, rng: np.random.Generator) -> list[np.ndarray]:
        frames = _read(source, None, self.spec.span, rng)[:: self.spec.stride]
        box, flip = self._crop_box(source, rng), rng.random() < 0.5
        return [_resample(f, box, self.spec.size, flip) for f in frames]

    def _camera_path(self, source: Source, rng: np.random.Generator) -> list[np.ndarray]:
        """A pan at constant speed (up to 3/4 of the view over the clip, per axis) with a zoom of
        up to 1.3x in or out, over a photo shown at a random scale."""
        photo = _read(source, 0, 1, rng)[0]
        h, w = photo.shape[:2]
        side0 = self._view_side(source, rng)
        side1 = float(np.clip(side0 * math.exp(rng.uniform(-1, 1) * math.log(1.3)), self.spec.size, min(w, h)))
        start = np.array([rng.uniform(0, w - side0), rng.uniform(0, h - side0)]) + side0 / 2
        end = start + rng.uniform(-0.75, 0.75, size=2) * side0
        end = np.clip(end, side1 / 2, np.array([w, h]) - side1 / 2)
        flip, n = rng.random() < 0.5, self.spec.frames
        out = []
        for k in range(n):
            a = k / max(1, n - 1)
            c, s = (1 - a) * start + a * end, (1 - a) * side0 + a * side1
            out.append(_resample(photo, (c[0] - s / 2, c[1] - s / 2, c[0] + s / 2, c[1] + s / 2), self.spec.size, flip))
        return out

    def _view_side(self, source: Source, rng: np.random.Generator) -> float:
        """Side, in source pixels, of the square that becomes the crop: log-uniform in [size, short]."""
        lo, hi = math.log(self.spec.size), math.log(source.short_side)
        return math.exp(rng.uniform(lo, hi)) if hi > lo else float(source.short_side)

    def _crop_box(self, source: Source, rng: np.random.Generator) -> tuple[float, float, float, float]:
        side = self._view_side(source, rng)
        x, y = rng.uniform(0, source.width - side), rng.uniform(0, source.height - side)
        return x, y, x + side, y + side


def _read(source: Source, start: int | None, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` frames from `start` (None: a random start). Containers may claim more frames than
    decode: then the start is drawn again within what did decode (a rule of the file alone, so
    samples stay deterministic)."""
    claimed = max(source.frames, count)
    if start is None:
        start = int(rng.integers(claimed - count + 1))
    frames = _FILES.read(source, start, start + count)
    if len(frames) < count:
        real = start + len(frames) if frames else len(_FILES.read(source, 0, None))
        if real < count:
            raise CvaeError(f"{source.path}: holds {real} frames, not the {count} a sample needs")
        start = int(rng.integers(real - count + 1))
        frames = _FILES.read(source, start, start + count)
    if len(frames) < count:
        raise CvaeError(f"{source.path}: frames {start}..{start + count} could not all be read")
    return frames


class DecodedFiles:
    """Decoded frames of recently used small files, up to `budget` bytes (one cache per DataLoader
    worker): a training run samples the same photos and short clips thousands of times, and
    decoding them again each time costs as much CPU as the model on a small machine. Files larger
    than a quarter of the budget are read from disk every time."""

    def __init__(self, budget: int = 1 << 30):
        self.budget, self.used = budget, 0
        self.entries: collections.OrderedDict[Path, list[np.ndarray]] = collections.OrderedDict()

    def read(self, source: Source, start: int, end: int | None) -> list[np.ndarray]:
        frames = self.entries.get(source.path)
        if frames is not None:
            self.entries.move_to_end(source.path)
            return frames[start:end]
        if max(source.frames, 1) * source.width * source.height * 3 > self.budget // 4:
            return list(media.read_frames(source.path, start=start, end=end))
        frames = list(media.read_frames(source.path))
        self.entries[source.path] = frames
        self.used += sum(f.nbytes for f in frames)
        while self.used > self.budget and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.used -= sum(f.nbytes for f in dropped)
        return frames[start:end]


_FILES = DecodedFiles()


def _resample(frame: np.ndarray, box: tuple[float, float, float, float], size: int, flip: bool) -> np.ndarray:
    """The square `box` of `frame` (source pixels, fractional) scaled to size x size, antialiased."""
    im = Image.fromarray(frame).resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)


class RankSteps(torch.utils.data.Sampler):
    """The sample indices of one rank, step after step from `start`: rank r of w takes samples
    [r*b, (r+1)*b) of each step's global batch of w*b, so w processes see what one process with
    the whole batch would."""

    def __init__(self, start: int, steps: int, batch: int, rank: int, world: int):
        self.start, self.steps, self.batch, self.rank, self.world = start, steps, batch, rank, world

    def __iter__(self) -> Iterator[int]:
        g = self.batch * self.world
        for step in range(self.start, self.steps):
            base = step * g + self.rank * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.batch


def collate(samples: list[tuple[torch.Tensor, list]]) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    return torch.stack([s[0] for s in samples]), [f for s in samples for f in s[1]]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding and resizing are per-sample; leave the cores to the model
    # Ctrl-C in a terminal, `timeout` and batch schedulers signal every process of the job. A worker
    # that died of it would end the run with a DataLoader error before the trainer reached its
    # checkpoint; the trainer stops at its next step and shuts the workers down itself.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def loader(dataset: TrainingClips, start: int, steps: int, batch: int, rank: int, world: int,
           workers: int) -> torch.utils.data.DataLoader:
    """Batches of this rank from step `start`, decoded in `workers` background processes."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=RankSteps(start, steps, batch, rank, world), num_workers=workers,
        collate_fn=collate, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None, persistent_workers=False)


def validation_set(data: Survey, frames: int, size: int, factor: int = 4) -> list[tuple[str, torch.Tensor]]:
    """One fixed sample per source: an image, or a video's first `frames` frames (fewer if it is
    shorter: the longest 1 + `factor`k that fits), scaled so the short side is `size`, centre-cropped."""
    out = []
    for source in data.sources:
        try:
            if source.is_image or frames == 1:
                got = list(media.read_frames(source.path, start=0, end=1))
            else:
                got = list(media.read_frames(source.path, start=0, end=frames))
                got = got[: 1 + factor * ((len(got) - 1) // factor)]
        except CvaeError:
            continue
        if not got:
            continue
        h, w = got[0].shape[:2]
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        pixels = np.stack([_resample(f, box, size, False) for f in got])
        out.append((source.path.name, torch.from_numpy(pixels).permute(3, 0, 1, 2).float().div_(127.5).sub_(1)))
    return out
