"""Manifest rows -> samples: whole clips cut from long videos, size buckets, stable keys.

A sample is what one latent file holds. Without `--clip-frames` a row is one sample, its frames
chosen by the row and the command line as always. With `--clip-frames N` (1 + 4k) and
`--clip-stride S` (default N) a video becomes the clips [s, s + N) for s = start, start + S, ...
inside the row's range (frames counted after `--fps` resampling; a shorter tail is left out); each
clip is encoded as a clip of its own, exactly as `cvae encode --frames s:s+N` encodes it. A photo
is one sample. With `--buckets`, each sample goes to the bucket nearest its aspect ratio, resized
to cover it and centre-cropped (`selection.Selection.bucket`, done while the frames are resized).

Keys name samples in shards (`KEY.safetensors`, `KEY.json`): the sample's per-file output path
without its suffix, `/` and every character outside [A-Za-z0-9_-] made `_`. They are stable (the
same row and clip always give the same key), contain no dot (WebDataset splits a member's name at
its first dot), and two samples with one key are refused before any work, naming both rows.
"""
from __future__ import annotations

import math
import re
import threading
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Sequence

from . import media
from .errors import CvaeError
from .manifest import SUFFIX, Clip
from .selection import Selection

# Presets: about this many pixels per frame, at the aspect ratios video trainers bucket by.
PRESETS = {"256px": 256 * 256, "512px": 512 * 512, "720p": 1280 * 720}
RATIOS = ((21, 9), (16, 9), (3, 2), (4, 3), (1, 1), (3, 4), (2, 3), (9, 16), (9, 21))
SIDE_STEP = 16  # preset sides are multiples of this (the model pads to 8; 16 suits most trainers)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

Size = tuple[int, int]  # (width, height)


def preset(area: int) -> tuple[Size, ...]:
    """One bucket per aspect ratio in `RATIOS`, each about `area` pixels."""
    def side(x: float) -> int:
        return max(SIDE_STEP, SIDE_STEP * round(x / SIDE_STEP))
    return tuple((side(math.sqrt(area * w / h)), side(math.sqrt(area * h / w))) for w, h in RATIOS)


def parse_buckets(text: str) -> tuple[Size, ...]:
    """`256px` / `512px` / `720p`, or comma-separated WxH sizes (`512x512,640x384`)."""
    text = text.strip().lower()
    if text in PRESETS:
        return preset(PRESETS[text])
    sizes = []
    for part in text.split(","):
        try:
            w, h = (int(x) for x in part.strip().split("x"))
            if w < 1 or h < 1:
                raise ValueError
        except ValueError:
            raise CvaeError(f"--buckets {text!r}: expected comma-separated WxH sizes (e.g. 512x512,640x384) "
                            f"or a preset ({', '.join(PRESETS)})") from None
        sizes.append((w, h))
    return tuple(dict.fromkeys(sizes))


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest (in log ratio) to width/height; ties to the first."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


@dataclass(frozen=True)
class Cutting:
    """How rows become samples: clip length and stride (None: a row is one sample), buckets."""

    clip_frames: int | None = None
    clip_stride: int | None = None
    buckets: tuple[Size, ...] | None = None

    def __post_init__(self):
        n, s = self.clip_frames, self.clip_stride
        if n is not None and (n < 1 or (n - 1) % 4):
            raise CvaeError(f"--clip-frames {n}: must be 1 + 4k (1, 5, 9, 17, 33, ...)")
        if s is not None and n is None:
            raise CvaeError("--clip-stride needs --clip-frames")
        if s is not None and s < 1:
            raise CvaeError(f"--clip-stride {s}: must be at least 1")
        if self.buckets is not None and not self.buckets:
            raise CvaeError("--buckets lists no size")

    @property
    def stride(self) -> int | None:
        return self.clip_stride or self.clip_frames

    @property
    def needs_media(self) -> bool:
        """Whether cutting a row needs its length or size (a look into the file)."""
        return self.clip_frames is not None or self.buckets is not None

    def to_json(self) -> dict:
        return {"clip_frames": self.clip_frames, "clip_stride": self.stride,
                "buckets": None if self.buckets is None else [f"{w}x{h}" for w, h in self.buckets]}


def key_of(output: PurePosixPath) -> str:
    """A sample's key: its per-file output path, suffix dropped, made safe for WebDataset."""
    return _UNSAFE.sub("_", str(output.with_suffix("")))


@dataclass(frozen=True)
class Sample:
    """One latent to make: a manifest row (and its position), which clip of it, and where it goes."""

    row: Clip
    index: int  # the row's position in the manifest (0-based)
    clip: int  # the clip's number within its row
    output: PurePosixPath  # per-file output, relative to out_dir
    start: int | None = None  # the clip's frames [start, end) after --fps; None: the row's own selection
    end: int | None = None
    bucket: Size | None = None
    frames: int | None = None  # expected (planning only)

    @property
    def key(self) -> str:
        return key_of(self.output)

    def selection(self, base: Selection = Selection()) -> Selection:
        """What to read: the command line, the row's own fields, then this clip and bucket."""
        select = self.row.selection(base)
        if self.start is not None:
            select = replace(select, start=self.start, end=self.end)
        if self.bucket is not None:
            select = replace(select, bucket=self.bucket, size=None, max_side=None)
        return select

    def record(self) -> dict:
        """What failures.jsonl says about the sample."""
        out = {**self.row.record(), "key": self.key, "clip": self.clip}
        if self.start is not None:
            out.update(start=self.start, end=self.end)
        return out

    def meta(self, latent_meta, shape: Sequence[int], base: Selection = Selection()) -> dict:
        """KEY.json: every column of the row as written, then the clip's frames (after --fps), size,
        rate, latent shape and bucket. `latent_meta` is the written file's `LatentMeta`."""
        start = self.selection(base).start
        out = dict(self.row.columns)
        out.update(start=start, end=start + latent_meta.frames, width=latent_meta.width, height=latent_meta.height,
                   fps=None if latent_meta.fps is None else float(latent_meta.fps), latent_shape=list(shape),
                   bucket=None if self.bucket is None else f"{self.bucket[0]}x{self.bucket[1]}")
        return out


@dataclass(frozen=True)
class Left:
    """A row (or its tail) that gives no sample, and why."""

    row: Clip
    index: int
    reason: str

    def record(self) -> dict:
        return {**self.row.record(), "reason": self.reason}


def video_length(info: media.MediaInfo, fps: float | None) -> int | None:
    """A video's length in frames after resampling to `fps` (None: unknown): `media`'s length
    (counted where the container states none), scaled to the new rate. Resampling's count may still
    be off by a frame at the end; a clip that runs short is left out when it is encoded."""
    return Selection(fps=fps).expected_frames(info)


def row_samples(row: Clip, index: int, info: media.MediaInfo | None, cutting: Cutting,
                base: Selection = Selection()) -> tuple[list[Sample], Left | None]:
    """The samples of one row. `info` is None when the file was not looked into (not needed, or
    unreadable: then the row is one sample, whose encode reports what is wrong)."""
    bucket = None
    if info is not None and cutting.buckets:
        bucket = nearest_bucket(info.width, info.height, cutting.buckets)
    select = row.selection(base)
    whole = Sample(row, index, 0, row.output, bucket=bucket,
                   frames=None if info is None else select.expected_frames(info))
    if info is None or info.is_image or cutting.clip_frames is None:
        return [whole], None
    n, stride = cutting.clip_frames, cutting.stride
    length = video_length(info, select.fps)
    hi = select.end if length is None else min(length, select.end or length)
    if hi is None:
        return [], Left(row, index, f"{row.path}: its length is unknown, so no clip of {n} frames can be cut")
    starts = range(select.start, hi - n + 1, stride)
    if not starts:
        span = max(0, hi - select.start)
        return [], Left(row, index, f"{row.path}: {span} frames (after --fps) in [{select.start}, {hi}), "
                                    f"fewer than --clip-frames {n}")
    stem = row.output.with_suffix("")
    return [Sample(row, index, k, stem.with_name(f"{stem.name}_{s:06d}{SUFFIX}"), s, s + n, bucket, n)
            for k, s in enumerate(starts)], None


def check_keys(samples: Sequence[Sample], keys: bool = True) -> None:
    """CvaeError when two samples would write one output or (with `keys`: shards) have one key,
    naming their rows."""
    seen: dict = {}
    for sample in samples:
        other = seen.setdefault(sample.key if keys else sample.output, sample)
        if other is not sample:
            what = (f"both write {sample.output}" if other.output == sample.output
                    else f"make the same key {sample.key} ({other.output}, {sample.output})")
            raise CvaeError(f"manifest lines {other.row.line} and {sample.row.line} {what} "
                            "(give them an `output` column)")


# --- one decode per video, shared by its clips ---------------------------------------------------

class _SharedVideo:
    """One decode of a video (resampled, resized and cropped as its clips ask) that serves its
    clips' frames by index, keeping only the frames a clip still open or yet to come may want:
    clips are asked for in order of their start, so frames before the latest start and before
    every open clip's position are dropped. Clips read from several threads (a batch), hence the lock."""

    def __init__(self, path, select: Selection, end: int):
        self.file = media.open_media(path)
        try:
            self.info = self.file.info
            self._frames = self.file.timed_frames(start=0, end=end, fps=select.fps, size=select.resize(self.info),
                                                  allow_partial=select.allow_partial, box=select.box(self.info))
        except BaseException:
            self.file.close()
            raise
        self.key = (select.fps, select.resize(self.info), select.box(self.info), select.allow_partial)
        self._buffer: deque = deque()
        self._base = 0  # the index of _buffer[0]
        self._error: BaseException | None = None
        self._ended = False
        self._lock = threading.Lock()
        self._positions: dict[int, int] = {}  # open clip -> the next index it wants
        self._floor = 0  # the start of the latest clip opened

    def open(self, view: int, start: int) -> None:
        with self._lock:
            self._positions[view] = start
            self._floor = max(self._floor, start)

    def close(self, view: int) -> None:
        with self._lock:
            self._positions.pop(view, None)
            self._trim()

    def get(self, view: int, i: int):
        """Frame `i` and its time (seconds from the video's first frame), or None past the end;
        the video's own error (corrupt, truncated) where frame `i` would have been."""
        with self._lock:
            if i < self._base:
                raise RuntimeError(f"frame {i} of {self.file.path} was dropped: clips asked out of order")
            while self._base + len(self._buffer) <= i and not self._ended:
                try:
                    self._buffer.append(next(self._frames))
                except StopIteration:
                    self._ended = True
                except Exception as e:  # the file's own failure: for every clip that reads this far
                    self._error, self._ended = e, True
            if i >= self._base + len(self._buffer):
                if self._error is not None:
                    raise self._error
                return None
            timed = self._buffer[i - self._base]
            self._positions[view] = i + 1
            self._trim()
            return timed

    def _trim(self) -> None:
        keep = min([*self._positions.values(), self._floor])
        while self._base < keep and self._buffer:
            self._buffer.popleft()
            self._base += 1

    def shutdown(self) -> None:
        close = getattr(self._frames, "close", None)
        if close is not None:
            close()
        self.file.close()


class _ClipView(media.MediaFile):
    """One clip of a shared decode, as an opened input (`convert.encode_files` reads it like a file)."""

    def __init__(self, shared: _SharedVideo, view: int, start: int, end: int, on_close):
        self.path, self.info = shared.file.path, shared.info
        self._shared, self._view, self._start, self._end, self._on_close = shared, view, start, end, on_close
        self._closed = False
        shared.open(view, start)

    def timed_frames(self, *, start: int = 0, end: int | None = None, fps=None, size=None,
                     allow_partial: bool = False, box=None):
        if (start, end) != (self._start, self._end):
            raise ValueError(f"clip view [{self._start}, {self._end}) asked for [{start}, {end})")
        if (fps, size, box, allow_partial) != self._shared.key:
            raise ValueError("clip view asked for another rate, size or crop than its video is decoded at")
        return self._timed_frames()

    def _timed_frames(self):
        with self:
            origin = None
            for i in range(self._start, self._end):
                got = self._shared.get(self._view, i)
                if got is None:
                    return
                frame, t = got
                origin = t if origin is None else origin
                yield frame, t - origin

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._shared.close(self._view)
            self._on_close()


class ClipReaders:
    """Openers for the clips of this rank's samples (`convert.encode_many` inputs) such that each
    video is decoded once for all its clips, instead of once per clip from its start (which costs
    length x clips). Give the samples in the order they will be opened; a video's decode ends
    when its last clip closes. Each clip gets exactly the frames `--frames s:s+N` would read."""

    def __init__(self, samples: Sequence[Sample], base: Selection = Selection()):
        self._base = base
        self._left: Counter = Counter(s.index for s in samples if s.start is not None)
        self._ends: dict[int, int] = {}
        for s in samples:
            if s.start is not None:
                self._ends[s.index] = max(self._ends.get(s.index, 0), s.end)
        self._open: dict[int, _SharedVideo] = {}
        self._views = 0

    def opener(self, sample: Sample):
        """What to hand `encode_many` for `sample`: its path, or (a clip) a function opening its view."""
        if sample.start is None:
            return sample.row.path
        return lambda: self._view(sample)

    def _view(self, sample: Sample) -> media.MediaFile:
        select = sample.selection(self._base)
        shared = self._open.get(sample.index)
        if shared is None:
            shared = self._open[sample.index] = _SharedVideo(sample.row.path, select, self._ends[sample.index])
        self._views += 1
        return _ClipView(shared, self._views, sample.start, sample.end, lambda: self._done(sample.index))

    def _done(self, index: int) -> None:
        self._left[index] -= 1
        if self._left[index] <= 0 and index in self._open:
            self._open.pop(index).shutdown()

    def close(self) -> None:
        for shared in self._open.values():
            shared.shutdown()
        self._open.clear()

    def __enter__(self) -> ClipReaders:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
