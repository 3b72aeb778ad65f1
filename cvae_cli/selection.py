"""`Selection`: which frames of an input, at what rate, size and crop: what every command and the
dataset runner read of a video or image."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import numpy as np

from . import media


@dataclass(frozen=True)
class Selection:
    """Which frames of an input, at what rate and size (all optional). `start`/`end` count frames
    after resampling to `fps`."""

    start: int = 0
    end: int | None = None
    fps: float | None = None
    size: tuple[int, int] | None = None  # (width, height)
    max_side: int | None = None
    allow_partial: bool = False
    bucket: tuple[int, int] | None = None  # (width, height): resized to cover it, centre-cropped

    def box(self, info: media.MediaInfo) -> tuple[float, float, float, float] | None:
        """The centred region of the input with the bucket's aspect ratio (None: the whole frame)."""
        if self.bucket is None:
            return None
        (bw, bh), (w, h) = self.bucket, (info.width, info.height)
        if w * bh > h * bw:  # wider than the bucket: crop the sides
            keep = h * bw / bh
            return ((w - keep) / 2, 0.0, (w + keep) / 2, float(h))
        keep = w * bh / bw
        return (0.0, (h - keep) / 2, float(w), (h + keep) / 2)

    def output_fps(self, info: media.MediaInfo):
        return Fraction(self.fps).limit_denominator(1001) if self.fps else info.fps

    def resize(self, info: media.MediaInfo) -> tuple[int, int] | None:
        """The (width, height) to resize to, or None to keep the input's."""
        if self.bucket is not None:
            return self.bucket
        if self.size is None and self.max_side:
            return media.fit_size(info.width, info.height, self.max_side)
        return self.size

    def model_size(self, info: media.MediaInfo) -> tuple[int, int]:
        """The (width, height) the model will see (before padding to multiples of 8)."""
        return self.resize(info) or (info.width, info.height)

    def model_shape(self, info: media.MediaInfo) -> tuple[int, int, bool, int | None]:
        """(width, height, is an image, expected frames): what the cut for this input depends on."""
        return (*self.model_size(info), info.is_image, self.expected_frames(info))

    def expected_frames(self, info: media.MediaInfo) -> int | None:
        """How many frames this selects, from the video's length (`media.MediaInfo.frame_count`):
        for progress bars and planning only (a damaged file decodes fewer). Without a length, a
        selection with an end still has a count; else None."""
        if info.is_image:
            return 1 if self.start == 0 and (self.end is None or self.end > 0) else 0
        if info.frame_count is None:
            return None if self.end is None else max(0, self.end - self.start)
        frames = info.frame_count * (self.fps / float(info.fps) if self.fps and info.fps else 1)
        end = frames if self.end is None else min(frames, self.end)
        return max(0, round(end - self.start))

    def frames(self, source: media.MediaFile) -> Iterator[np.ndarray]:
        """The selected frames of an opened input."""
        return source.frames(**self._arguments(source.info))

    def timed_frames(self, source: media.MediaFile) -> Iterator[tuple[np.ndarray, Fraction]]:
        """The selected frames of an opened input, each with its time in seconds from the first."""
        return source.timed_frames(**self._arguments(source.info))

    def _arguments(self, info: media.MediaInfo) -> dict:
        return dict(start=self.start, end=self.end, fps=self.fps, size=self.resize(info),
                    allow_partial=self.allow_partial, box=self.box(info))

    def variable_times(self, info: media.MediaInfo, times: list) -> tuple | None:
        """The frame times worth keeping: a video's own, when they are off the 1/fps grid by more
        than a tick of its clock (a variable frame rate); None otherwise."""
        if info.is_image or self.fps or not info.fps:
            return None
        constant = media.is_constant_rate(times, info.fps, info.time_base or Fraction(0))
        return None if constant else tuple(times)
