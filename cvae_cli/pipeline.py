"""File-level jobs: a video or image in, a latent file out, and back, without holding a video.

container -> `media` frames -> `stream` chunks through the model -> `latents` file, and the mirror
image. `reconstruct` chains both in memory and scores the result against its input as it goes.
Each job reports progress as a count of frames through an optional callback.
"""
from __future__ import annotations

import collections
import contextlib
from fractions import Fraction
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from . import media
from .checkpoints import model_id
from .errors import CvaeError
from .latents import LatentFile, LatentMeta, LatentWriter, check_compatible
from .metrics import FrameMetrics, frames_to_tensor
from .model import CausalVAE
from .stream import StreamOptions, decode_latents, encode_frames, padded_length, padded_size

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Selection:
    """Which frames of an input, at what rate and size (all optional)."""

    start: int = 0
    end: int | None = None
    fps: float | None = None
    size: tuple[int, int] | None = None  # (width, height)
    max_side: int | None = None
    allow_partial: bool = False

    def output_fps(self, info: media.MediaInfo):
        return Fraction(self.fps).limit_denominator(1001) if self.fps else info.fps

    def frames(self, src: Path) -> tuple[media.MediaInfo, tuple[int, int], Iterator[np.ndarray]]:
        """The input's info, the (width, height) the model will see, and the selected frames."""
        info = media.probe(src)
        size = self.size
        if size is None and self.max_side:
            size = media.fit_size(info.width, info.height, self.max_side)
        frames = media.read_frames(src, start=self.start, end=self.end, fps=self.fps, size=size,
                                   allow_partial=self.allow_partial)
        return info, size or (info.width, info.height), frames


@dataclass
class Result:
    """What a job did, for messages and summaries."""

    output: Path
    frames: int
    metrics: FrameMetrics | None = None
    extra: dict = field(default_factory=dict)


def _counted(frames: Iterable[np.ndarray], progress: Progress | None) -> Iterator[np.ndarray]:
    for frame in frames:
        yield frame
        if progress:
            progress(1)


def _posterior_latent(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return mean
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean)
    return mean + torch.exp(0.5 * logvar) * noise


def encode_file(model: CausalVAE, src: Path, dst: Path, options: StreamOptions, select: Selection = Selection(),
                *, seed: int | None = None, save_logvar: bool = False, progress: Progress | None = None) -> Result:
    """Encode one video or image to a latent file; `seed` samples the posterior instead of its mean."""
    info, (width, height), frames = select.frames(src)
    fs = model.config.space_compression
    fps = select.output_fps(info)
    meta = LatentMeta(model_id=model_id(model), model_config=model.config.to_json(), frames=0,
                      height=height, width=width, padded_frames=0, padded_height=padded_size(height, fs),
                      padded_width=padded_size(width, fs), fps=None if info.is_image else fps,
                      source=src.name, sampled=seed is not None)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    counter = [0]
    with LatentWriter(dst, meta, with_logvar=save_logvar) as writer:
        for mean, logvar in encode_frames(model, _counted(frames, progress), options, counter):
            writer.append(_posterior_latent(mean.float(), logvar.float(), generator),
                          logvar if save_logvar else None)
        if counter[0] == 0:
            raise CvaeError(f"{src}: no frames selected")
        writer.meta = replace(meta, frames=counter[0],
                              padded_frames=padded_length(counter[0], model.config.time_compression))
    return Result(dst, counter[0])


def _latent_chunks(latent: LatentFile, options: StreamOptions) -> Iterator[torch.Tensor]:
    return latent.iter_chunks(max(1, options.chunk // 4))


def _write_frames(dst: Path, chunks: Iterable[np.ndarray], fps, limit: int, crf: int, progress: Progress | None,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None) -> int:
    """Write frame chunks to a video (or the first frame to an image); stop after `limit` frames."""
    transform = transform or (lambda chunk: chunk)
    if fps is None or media.is_image(dst):
        if dst.suffix.lower() not in media.IMAGE_SUFFIXES:
            raise CvaeError(f"{dst}: a single image decodes to an image file (use a .png name)")
        media.write_image(dst, transform(next(iter(chunks))[:1])[0])
        if progress:
            progress(1)
        return 1
    written = 0
    with contextlib.ExitStack() as stack:
        writer = None
        for chunk in chunks:
            chunk = transform(chunk[: limit - written])
            if writer is None:
                writer = stack.enter_context(media.VideoWriter(dst, fps, chunk.shape[2], chunk.shape[1], crf=crf))
            for frame in chunk:
                writer.write(frame)
            written += len(chunk)
            if progress:
                progress(len(chunk))
            if written >= limit:
                break
    return written


def decode_file(model: CausalVAE, src: Path, dst: Path, options: StreamOptions, *, crf: int = 18,
                force: bool = False, progress: Progress | None = None) -> Result:
    """Decode a latent file to mp4 (or png for a single frame), at its original size and rate."""
    latent = LatentFile.open(src)
    meta = latent.meta
    if not force:
        check_compatible(meta, model_id(model), where=str(src))
    chunks = decode_latents(model, _latent_chunks(latent, options), options, meta.height, meta.width)
    return Result(dst, _write_frames(dst, chunks, meta.fps, meta.frames, crf, progress))


def reconstruct_file(model: CausalVAE, src: Path, dst: Path, options: StreamOptions, select: Selection = Selection(),
                     *, crf: int = 18, side_by_side: bool = False, progress: Progress | None = None) -> Result:
    """Encode and decode in one pass, scoring every output frame against its input (PSNR, SSIM)."""
    info, (width, height), frames = select.frames(src)
    pending: collections.deque[np.ndarray] = collections.deque()  # inputs awaiting their output
    counter, metrics = [0], FrameMetrics()

    def remember(frames):
        for frame in frames:
            pending.append(frame)
            yield frame

    def score(chunk: np.ndarray) -> np.ndarray:
        chunk = chunk[: len(pending)]  # frames past the input's end decode its padding
        inputs = np.stack([pending.popleft() for _ in range(len(chunk))])
        metrics.add(frames_to_tensor(inputs), frames_to_tensor(chunk))
        return np.concatenate([inputs, chunk], axis=2) if side_by_side else chunk

    latents = (mean for mean, _ in encode_frames(model, remember(frames), options, counter))
    chunks = decode_latents(model, latents, options, height, width)
    fps = None if info.is_image else select.output_fps(info)
    written = _write_frames(dst, chunks, fps, 2**62, crf, progress, transform=score)
    return Result(dst, written, metrics)

