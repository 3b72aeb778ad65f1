"""File-level jobs: a video or image in, a latent file out, and back, without holding a video.

container -> `media` frames -> `stream` chunks through the model -> `latents` file, and the mirror
image. `reconstruct` chains both in memory and scores the result against its input as it goes.
Each job reports progress as a count of frames through an optional callback.
"""
from __future__ import annotations

import collections
import contextlib
import queue
import threading
from fractions import Fraction
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import media
from .checkpoints import model_id
from .errors import CvaeError
from .latents import LatentFile, LatentMeta, LatentWriter, check_compatible
from .metrics import FrameMetrics, frames_to_tensor
from .model import CausalVAE
from .stream import StreamOptions, decode_latents, encode_batch, encode_frames, padded_length, padded_size

Progress = Callable[[int], None]
PREFETCH = 2  # items a background stage may run ahead of its consumer (bounds memory)


def background(items: Iterable, depth: int = PREFETCH) -> Iterator:
    """Iterate `items` in a thread, up to `depth` ahead, so container decode and colour conversion,
    the model's GPU work, and mp4 encode/latent writes overlap instead of taking turns.

    The producer's exception is re-raised here, in the consumer, unchanged; a consumer that stops
    early (or fails) stops the producer and closes its generator. depth 0 runs inline."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    break
            else:
                put((end, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((end, error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="cvae-background", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


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

    def resize(self, info: media.MediaInfo) -> tuple[int, int] | None:
        """The (width, height) to resize to, or None to keep the input's."""
        if self.size is None and self.max_side:
            return media.fit_size(info.width, info.height, self.max_side)
        return self.size

    def model_size(self, src: Path) -> tuple[int, int]:
        """The (width, height) the model will see for this input (before padding to multiples of 8)."""
        info = media.probe(src)
        return self.resize(info) or (info.width, info.height)

    def frames(self, src: Path, times: list | None = None) -> tuple[media.MediaInfo, tuple[int, int], Iterator[np.ndarray]]:
        """The input's info, the (width, height) the model will see, and the selected frames (their
        times, seconds from the first, appended to `times` when given)."""
        info = media.probe(src)
        size = self.resize(info)
        frames = media.read_frames(src, start=self.start, end=self.end, fps=self.fps, size=size,
                                   allow_partial=self.allow_partial, times=times)
        return info, size or (info.width, info.height), frames

    def variable_times(self, info: media.MediaInfo, times: list) -> tuple | None:
        """The frame times worth keeping: a video's own, when they are off the 1/fps grid by more
        than a tick of its clock (a variable frame rate); None otherwise."""
        if info.is_image or self.fps or not info.fps:
            return None
        constant = media.is_constant_rate(times, info.fps, info.time_base or Fraction(0))
        return None if constant else tuple(times)


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
                *, seed: int | None = None, save_logvar: bool = False, progress: Progress | None = None,
                prefetch: int = PREFETCH) -> Result:
    """Encode one video or image to a latent file; `seed` samples the posterior instead of its mean.

    Three stages overlap (`prefetch` > 0): reading frames, the model, writing latents."""
    outcome, = encode_files(model, [(src, dst, select)], options, seed=seed, save_logvar=save_logvar,
                            progress=progress, prefetch=prefetch)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def encode_files(model: CausalVAE, jobs: Sequence[tuple[Path, Path, Selection]], options: StreamOptions, *,
                 seed: int | None = None, save_logvar: bool = False, progress: Progress | None = None,
                 prefetch: int = PREFETCH) -> list[Result | Exception]:
    """Encode several (input, output, selection) jobs of one model size together: their chunks are
    stacked along the batch, so one model call serves them all (what keeps a GPU busy on images and
    short clips). Each output is what `encode_file` would write for it alone, up to the rounding of
    batched kernels.

    An input that fails (unreadable, truncated, an unwritable output) ends its own stream and comes
    back as its exception, with nothing written; the others go on. A model failure raises."""
    outcomes: list[Result | Exception | None] = [None] * len(jobs)
    writers: dict[int, LatentWriter] = {}
    streams, counters, generators, infos, times = [], {}, {}, {}, {}

    def guarded(k: int, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        try:
            yield from frames
        except Exception as e:  # this input's failure: end its stream, keep the batch going
            outcomes[k] = e

    identity = model_id(model)  # once per call: a model not loaded from a file is hashed each time
    try:
        for k, (src, dst, select) in enumerate(jobs):
            times[k] = []
            try:
                infos[k], (width, height), frames = select.frames(src, times[k])
                meta = _latent_meta(model, identity, src, infos[k], width, height, select, seed)
                writers[k] = LatentWriter(dst, meta, with_logvar=save_logvar)
            except CvaeError as e:
                outcomes[k] = e
                continue
            counters[k] = [0]
            generators[k] = torch.Generator().manual_seed(seed) if seed is not None else None
            streams.append(guarded(k, background(_counted(frames, progress), prefetch)))
        order = list(writers)  # stream index -> job index
        chunks = encode_batch(model, streams, options, [counters[k] for k in order])
        for i, mean, logvar in background(chunks, prefetch):
            k = order[i]
            if outcomes[k] is None:
                writers[k].append(_posterior_latent(mean.float(), logvar.float(), generators[k]),
                                  logvar if save_logvar else None)
        for k, writer in writers.items():
            if outcomes[k] is not None:
                continue
            (src, dst, select), n = jobs[k], counters[k][0]
            try:
                if n == 0:
                    raise CvaeError(f"{src}: no frames selected")
                writer.meta = replace(writer.meta, frames=n,
                                      padded_frames=padded_length(n, model.config.time_compression),
                                      frame_times=select.variable_times(infos[k], times[k]))
                writer.close()
                outcomes[k] = Result(dst, n)
            except CvaeError as e:
                outcomes[k] = e
    finally:
        for writer in writers.values():
            writer.abort()
    return outcomes


def _latent_meta(model: CausalVAE, identity: str, src: Path, info: media.MediaInfo, width: int, height: int,
                 select: Selection, seed: int | None) -> LatentMeta:
    """What decode needs to know, before the frame count (filled in at the end)."""
    fs = model.config.space_compression
    return LatentMeta(model_id=identity, model_config=model.config.to_json(), frames=0,
                      height=height, width=width, padded_frames=0, padded_height=padded_size(height, fs),
                      padded_width=padded_size(width, fs), fps=None if info.is_image else select.output_fps(info),
                      source=src.name, sampled=seed is not None)


def batched(items: Sequence, size: int, key: Callable | None = None) -> list[list]:
    """Cut `items` into lists of at most `size` that share `key(item)` (for `encode_files`: one model
    size per batch), first-come order within each key; `size` 1 keeps every item alone, in order."""
    if size <= 1 or key is None:
        return [[item] for item in items]
    by_key: dict = {}
    for item in items:
        by_key.setdefault(key(item), []).append(item)
    return [group[i:i + size] for group in by_key.values() for i in range(0, len(group), size)]


def size_key(src: Path, select: Selection) -> object:
    """What inputs must share to be encoded in one batch: the model size; an input that cannot be
    probed gets a key of its own, so it runs alone and reports its error."""
    try:
        return select.model_size(src)
    except CvaeError:
        return src


def _latent_chunks(latent: LatentFile, options: StreamOptions) -> Iterator[torch.Tensor]:
    return latent.iter_chunks(max(1, options.chunk // 4))


def _write_frames(dst: Path, chunks: Iterable[np.ndarray], fps, limit: int, crf: int, progress: Progress | None,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  times: Sequence | None = None, time_base: Fraction | None = None) -> int:
    """Write frame chunks to a video (or the first frame to an image); stop after `limit` frames.
    `times` (seconds, in ticks of `time_base`) keep a variable frame rate."""
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
                writer = stack.enter_context(media.VideoWriter(dst, fps, chunk.shape[2], chunk.shape[1], crf=crf,
                                                               times=times, time_base=time_base))
            for frame in chunk:
                writer.write(frame)
            written += len(chunk)
            if progress:
                progress(len(chunk))
            if written >= limit:
                break
    return written


def decode_file(model: CausalVAE, src: Path, dst: Path, options: StreamOptions, *, crf: int = 18,
                force: bool = False, progress: Progress | None = None, prefetch: int = PREFETCH) -> Result:
    """Decode a latent file to mp4 (or png for a single frame), at its original size and rate;
    the model runs in a background thread while this one encodes the mp4 (`prefetch` > 0)."""
    latent = LatentFile.open(src)
    meta = latent.meta
    if not force:
        check_compatible(meta, model_id(model), where=str(src))
    chunks = decode_latents(model, _latent_chunks(latent, options), options, meta.height, meta.width)
    chunks = background(chunks, prefetch)
    return Result(dst, _write_frames(dst, chunks, meta.fps, meta.frames, crf, progress, times=meta.frame_times))


def reconstruct_file(model: CausalVAE, src: Path, dst: Path, options: StreamOptions, select: Selection = Selection(),
                     *, crf: int = 18, side_by_side: bool = False, progress: Progress | None = None,
                     prefetch: int = PREFETCH) -> Result:
    """Encode and decode in one pass, scoring every output frame against its input (PSNR, SSIM);
    reading, the model and scoring + mp4 encode run in overlapping threads (`prefetch` > 0)."""
    times: list = []  # the input's frame times, kept for the output (filled ahead of the writer)
    info, (width, height), frames = select.frames(src, times)
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

    latents = (mean for mean, _ in encode_frames(model, remember(background(frames, prefetch)), options, counter))
    chunks = background(decode_latents(model, latents, options, height, width), prefetch)
    fps = None if info.is_image else select.output_fps(info)
    keep_times = not (info.is_image or select.fps)
    written = _write_frames(dst, chunks, fps, 2**62, crf, progress, transform=score,
                            times=times if keep_times else None, time_base=info.time_base)
    return Result(dst, written, metrics)

