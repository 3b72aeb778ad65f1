"""One input to its output, without holding a video: a video or image -> a latent file, a latent
file -> a video, and both in one pass scored against the input; and many inputs under one failure
policy (`per_input`).

container -> `media` frames -> `stream` chunks through the model -> `latents` file, and the mirror
image. Inputs are opened once (`media.MediaFile`, `latents.LatentFile`) and passed along opened.
Each job reports progress as a count of frames through the model, through an optional callback.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import interrupt, media
from .atomic import remove_stale
from .budget import Policy, is_out_of_memory, out_of_memory, within_memory
from .checkpoints import model_id
from .device import dtype_name, placement
from .errors import CvaeError
from .latents import LatentFile, LatentMeta, LatentWriter, check_compatible
from .metrics import FrameMetrics, frames_to_tensor
from .model import CausalVAE, DiagonalGaussian
from .prefetch import PREFETCH, background
from .selection import Selection
from .stream import StreamOptions, decode_latents, encode_batch, encode_frames, padded_length, padded_size

Progress = Callable[[float], None]  # frames done since the last call (a photo's move by tiles)
# (name, expected frames or None) -> a context giving the Progress callback for one batch of inputs
ProgressFactory = Callable[[str, "int | None"], ContextManager[Progress]]
# How to cut an input of a given (width, height, is an image): fixed, or chosen per input (see
# stream.choose_options).
Options = StreamOptions | Callable[[int, int, bool], StreamOptions]
DECODE_SHARE = 2 / 3  # of a reconstruction's model time: decoding costs about twice encoding (cvae bench)


class PhotoProgress:
    """Progress for photos, which are one frame and one step through the model each way: the tiles
    of a large photo move the count, so it shows how far the photo is and the time left instead of
    0/1 for minutes. Each tiled pass stands for its `share` of the frames and advances at most 99% of
    them; the frames' own reports, as they are done, make up the rest, so the count ends exact.
    Tiles report from the model's threads, frames from another: one lock, held while reporting."""

    def __init__(self, progress: Progress, frames: int):
        self.progress, self.frames = progress, frames
        self.shown = self.done = 0.0
        self.lock = threading.Lock()

    def tiles(self, share: float) -> Callable[[float], None]:
        def tile(fraction: float) -> None:
            with self.lock:
                self._show(min(fraction * share * self.frames, 0.99 * self.frames - self.shown))
        return tile

    def __call__(self, frames: int) -> None:
        with self.lock:
            self.done += frames
            self._show(self.done - self.shown)

    def _show(self, add: float) -> None:
        if add > 0:
            self.shown += add
            self.progress(add)


def by_tiles(progress: Progress | None, photos: int, *shares: float) -> tuple[Progress | None, list]:
    """(where to report frames, an `on_tile` for each tiled pass of `shares`): for `photos` > 0
    (inputs of one frame each), a `PhotoProgress` that their tiles move; else `progress` as it is
    and no tile callbacks."""
    if not (photos and progress):
        return progress, [None] * len(shares)
    photo = PhotoProgress(progress, photos)
    return photo, [photo.tiles(share) for share in shares]


# --- the one failure policy for many inputs ----------------------------------------------------

def per_input(error: BaseException) -> bool:
    """Whether a failure belongs to one input, so a run of many reports it and goes on: the
    input's own problem (a `CvaeError`: unreadable, truncated, unwritable) or running out of memory
    on its size. Anything else (a bug, a broken driver, an interruption) ends the run."""
    return isinstance(error, CvaeError) or is_out_of_memory(error)


def attempt(run: Callable[[Options], list], count: int, options: Options, where: str, device=None,
            note: Callable[[str], None] | None = None) -> list:
    """`run(options)`, once more with a smaller cut if it runs out of memory (`budget.within_memory`),
    or, when it fails by `per_input`, that error for each of its `count` inputs. Other failures
    propagate."""
    try:
        return within_memory(run, options, where, device, note or (lambda message: None))
    except Exception as error:
        if not per_input(error):
            raise
        if is_out_of_memory(error):  # not from the model's steps: still one line, for this input
            error = out_of_memory(error, where, device)
        return [error] * count


@dataclass
class Result:
    """What a job did, for messages and summaries."""

    output: Path
    frames: int
    metrics: FrameMetrics | None = None
    metrics_error: str | None = None  # why scoring stopped (the output was written all the same)


def _options(options: Options, width: int, height: int, image: bool, frames: int | None = None,
             batch: int = 1) -> StreamOptions:
    if isinstance(options, Policy):  # the budget's count depends on the length (whole clips) and batch
        return options(width, height, image, frames=frames, batch=batch)
    return options(width, height, image) if callable(options) else options


def check_finite(latent: torch.Tensor, where: str) -> None:
    """CvaeError when an encoded latent holds NaN or infinity (fp16 overflow on some cards, a broken
    driver): such a file would decode to garbage, so it is never written."""
    if not torch.isfinite(latent).all():
        raise CvaeError(f"{where}: the latent holds NaN or infinite values, computed in {dtype_name(latent.dtype)}; "
                        "nothing was written (try --dtype bf16 or --dtype fp32)")


# --- encode -----------------------------------------------------------------------------------

@dataclass
class _Encoding:
    """One input of `encode_files` as it runs."""

    source: media.MediaFile
    output: Path
    select: Selection
    writer: LatentWriter | None = None
    times: list = field(default_factory=list)  # the times of the frames read so far
    read: int = 0  # frames read so far
    counted: int = 0  # frames reported to progress: those the model has turned into latents
    latents: int = 0  # latent frames written
    outcome: Result | Exception | None = None


def encode_file(model: CausalVAE, src: media.MediaFile | Path, dst: Path, options: Options,
                select: Selection = Selection(), *, seed: int | None = None, save_logvar: bool = False,
                progress: Progress | None = None, prefetch: int = PREFETCH) -> Result:
    """Encode one video or image to a latent file; `seed` samples the posterior instead of its mean.

    Three stages overlap (`prefetch` > 0): reading frames, the model, writing latents."""
    outcome, = encode_files(model, [(src, dst, select)], options, seed=seed, save_logvar=save_logvar,
                            progress=progress, prefetch=prefetch)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def encode_files(model: CausalVAE, jobs: Sequence[tuple[media.MediaFile | Path, Path, Selection]], options: Options,
                 *, seed: int | None = None, save_logvar: bool = False, progress: Progress | None = None,
                 prefetch: int = PREFETCH) -> list[Result | Exception]:
    """Encode several (input, output, selection) jobs of one model size together: their chunks are
    stacked along the batch, so one model call serves them all (what keeps a GPU busy on images and
    short clips). Each output is what `encode_file` would write for it alone, up to the rounding of
    batched kernels, except that images batched with videos are cut as videos (`options` may tile
    images alone). Inputs may come opened (`media.MediaFile`) or as paths; all are closed here.

    An input that fails (unreadable, truncated, an unwritable output) ends its own stream and comes
    back as its exception, with nothing written; the others go on. A model failure raises."""
    ft = model.config.time_compression
    identity = model_id(model)  # once per call: a model not loaded from a file is hashed each time
    runs: list[_Encoding] = []

    def guarded(run: _Encoding, timed: Iterable[tuple[np.ndarray, Fraction]]) -> Iterator[np.ndarray]:
        try:
            for frame, t in timed:
                run.times.append(t)
                run.read += 1
                yield frame
        except Exception as e:  # this input's failure: end its stream, keep the batch going
            run.outcome = e

    report = progress

    def advance(run: _Encoding, latents: int) -> None:
        """Report the frames these latents stand for (1, then 4 per latent), at most those read."""
        run.latents += latents
        done = min(1 + ft * (run.latents - 1), run.read)
        if report and done > run.counted:
            report(done - run.counted)
        run.counted = max(run.counted, done)

    with contextlib.ExitStack() as stack:
        for src, dst, select in jobs:
            try:
                run = _Encoding(stack.enter_context(open_media_file(src)), dst, select)
            except CvaeError as e:
                runs.append(_Encoding(None, dst, select, outcome=e))
                continue
            runs.append(run)
            try:
                width, height = select.model_size(run.source.info)
                meta = _latent_meta(model, identity, run.source, width, height, select, seed)
                run.writer = stack.enter_context(_aborting(LatentWriter(dst, meta, with_logvar=save_logvar)))
            except CvaeError as e:
                run.outcome = e
        live = [run for run in runs if run.writer is not None]
        if not live:
            return [run.outcome for run in runs]
        width, height = live[0].select.model_size(live[0].source.info)
        readers = [stack.enter_context(contextlib.closing(background(run.select.timed_frames(run.source), prefetch)))
                   for run in live]
        streams = [guarded(run, reader) for run, reader in zip(live, readers)]
        image = all(run.source.info.is_image for run in live)
        lengths = [run.select.expected_frames(run.source.info) for run in live]
        frames = None if None in lengths else max(lengths)
        opts = _options(options, width, height, image, frames, len(live))
        report, (on_tile,) = by_tiles(progress, len(live) if image else 0, 1.0)
        chunks = encode_batch(model, streams, opts, on_tile=on_tile)
        with contextlib.closing(background(chunks, prefetch)) as chunks:
            for i, mean, logvar in chunks:
                run = live[i]
                if run.outcome is None and not torch.isfinite(mean).all():
                    try:
                        check_finite(mean, str(run.source.path))
                    except CvaeError as e:  # this input fails; its writer is aborted on the way out
                        run.outcome = e
                    if all(r.outcome is not None for r in live):
                        break
                if run.outcome is None:
                    latent = mean if seed is None else DiagonalGaussian(mean[None].float(), logvar[None].float()) \
                        .sample(seed=seed, first_frame=run.latents)[0]
                    run.writer.append(latent, logvar if save_logvar else None)
                    advance(run, mean.shape[1])
        for run in live:
            if run.outcome is None:
                run.outcome = _finish(run, model)
    return [run.outcome for run in runs]


@contextlib.contextmanager
def _aborting(writer: LatentWriter) -> Iterator[LatentWriter]:
    """The writer, whose temporary files go whatever happens (after `close` there are none)."""
    try:
        yield writer
    finally:
        writer.abort()


def stored(mean: torch.Tensor, logvar: torch.Tensor, seed: int | None, first_frame: int) -> torch.Tensor:
    """What a latent file keeps of a chunk of the posterior: its mean, or with `seed` a sample whose
    noise depends on the seed and the latent frame only (`DiagonalGaussian.sample`)."""
    if seed is None:
        return mean
    return DiagonalGaussian(mean[None].float(), logvar[None].float()).sample(seed=seed, first_frame=first_frame)[0]


def latent_chunks(latents: torch.Tensor | LatentFile, options: StreamOptions, model: CausalVAE) -> Iterable:
    """A latent in chunks of as many latent frames as `options.chunk` pixel frames make."""
    step = max(1, options.chunk // model.config.time_compression)
    return latents.iter_chunks(step) if isinstance(latents, LatentFile) else latents.split(step, dim=1)


def _finish(run: _Encoding, model: CausalVAE) -> Result | CvaeError:
    n = run.read
    try:
        if n == 0:
            raise CvaeError(f"{run.source.path}: no frames selected")
        run.writer.meta = replace(run.writer.meta, frames=n,
                                  padded_frames=padded_length(n, model.config.time_compression),
                                  frame_times=run.select.variable_times(run.source.info, run.times))
        run.writer.close()
    except CvaeError as e:
        return e
    return Result(run.output, n)


def _latent_meta(model: CausalVAE, identity: str, source: media.MediaFile, width: int, height: int,
                 select: Selection, seed: int | None) -> LatentMeta:
    """What decode needs to know, before the frame count (filled in at the end)."""
    fs, info = model.config.space_compression, source.info
    return LatentMeta(model_id=identity, model_config=model.config.to_json(), frames=0,
                      height=height, width=width, padded_frames=0, padded_height=padded_size(height, fs),
                      padded_width=padded_size(width, fs), fps=None if info.is_image else select.output_fps(info),
                      source=source.path.name, sampled=seed is not None)


def batched(items: Iterable, size: int, key: Callable | None = None, held: int = 256) -> Iterator[list]:
    """Cut `items` into lists of at most `size` that share `key(item)` (for `encode_files`: one model
    size per batch), first-come order within each key, as they come: a list goes out when full,
    or, the largest one, when `held` items wait; the rest at the end. `size` 1 keeps every item
    alone, in order."""
    if size <= 1 or key is None:
        yield from ([item] for item in items)
        return
    waiting: dict = {}
    for item in items:
        group = waiting.setdefault(key(item), [])
        group.append(item)
        if len(group) == size:
            yield waiting.pop(key(item))
        elif sum(map(len, waiting.values())) >= held:
            yield waiting.pop(max(waiting, key=lambda k: len(waiting[k])))
    yield from waiting.values()


def encode_many(model: CausalVAE, jobs: Sequence[tuple[Path | Callable[[], media.MediaFile], Path, Selection]],
                options: Options, *,
                batch_size: int = 1, seed: int | None = None, save_logvar: bool = False,
                progress: ProgressFactory | None = None,
                note: Callable[[str], None] | None = None) -> Iterator[tuple[int, Result | Exception]]:
    """Encode many (input, output, selection) jobs, `batch_size` of one model size at a time,
    opening each input once (an input may be a function that opens it, e.g. `samples.ClipReaders`);
    yield (job index, outcome) as outcomes come. A failure of one input
    (`per_input`) is its outcome and the others go on; any other failure raises."""
    failed: list[tuple[int, Exception]] = []

    def opened() -> Iterator[tuple[int, media.MediaFile]]:
        for k, (src, _, _) in enumerate(jobs):
            interrupt.check()  # between inputs
            try:
                yield k, src() if callable(src) else media.open_media(src)
            except CvaeError as e:  # fails before the model, alone
                failed.append((k, e))

    def size_of(item: tuple[int, media.MediaFile]) -> tuple[int, int]:
        k, source = item
        return jobs[k][2].model_size(source.info)

    for group in batched(opened(), batch_size, key=size_of):
        yield from failed
        failed.clear()
        batch = [(source, jobs[k][1], jobs[k][2]) for k, source in group]
        expected = [select.expected_frames(source.info) for source, _, select in batch]
        name = batch[0][0].path.name if len(batch) == 1 else f"{len(batch)} files"
        with progress(name, None if None in expected else sum(expected)) if progress else \
                contextlib.nullcontext(None) as advance:
            where = str(batch[0][0].path) if len(batch) == 1 else f"{len(batch)} files ({batch[0][0].path}, ...)"
            again = [jobs[k] for k, _ in group]  # a retry after running out of memory opens its inputs afresh
            tries = iter([lambda: batch, lambda: [(src() if callable(src) else src, dst, select)
                                                  for src, dst, select in again]])
            outcomes = attempt(lambda opts: encode_files(model, next(tries)(), opts, seed=seed, save_logvar=save_logvar,
                                                         progress=advance), len(batch), options, where,
                               placement(model)[0], note)
        yield from ((k, outcome) for (k, _), outcome in zip(group, outcomes))
    yield from failed


# --- decode -----------------------------------------------------------------------------------

def _write_frames(dst: Path, chunks: Iterable[np.ndarray], fps, limit: int, crf: int, progress: Progress | None,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  times: Sequence | None = None, time_base: Fraction | None = None) -> int:
    """Write frame chunks to a video (or the first frame of an image's to an image file); stop
    after `limit` frames. `times` (seconds, in ticks of `time_base`) keep a variable frame rate."""
    transform = transform or (lambda chunk: chunk)
    with contextlib.closing(iter(chunks)) as chunks:
        if fps is None:
            first = next(chunks, None)
            if first is None:  # nothing selected: nothing written
                return 0
            media.write_image(dst, transform(first[:1])[0])
            if progress:
                progress(1)
            return 1
        written = 0
        with contextlib.ExitStack() as stack:
            writer = None
            for chunk in chunks:
                chunk = transform(chunk[: limit - written])
                if writer is None:
                    writer = stack.enter_context(media.VideoWriter(dst, fps, chunk.shape[2], chunk.shape[1],
                                                                   crf=crf, times=times, time_base=time_base))
                for frame in chunk:
                    writer.write(frame)
                written += len(chunk)
                if progress:
                    progress(len(chunk))
                if written >= limit:
                    break
        return written


def check_output_kind(dst: Path, image: bool) -> None:
    """CvaeError unless `dst` names what a decode of an image (an image file) or of a video (a
    video container we write) produces: a file is never written under a name that lies."""
    if image and dst.suffix.lower() not in media.IMAGE_SUFFIXES:
        raise CvaeError(f"{dst}: an image decodes to an image file (use one of "
                        f"{', '.join(sorted(media.IMAGE_SUFFIXES))})")
    if not image:
        media.video_format(dst)


def decode_file(model: CausalVAE, src: LatentFile | Path, dst: Path, options: Options, *, crf: int = 18,
                force: bool = False, progress: Progress | None = None, prefetch: int = PREFETCH) -> Result:
    """Decode a latent file to a video (or an image's latent to an image) at its original size and
    rate; the model runs in a background thread while this one encodes the video (`prefetch` > 0).
    The architecture must match even with `force`, which only waives the weights' identity."""
    latent = src if isinstance(src, LatentFile) else LatentFile.open(src)
    meta = latent.meta
    made_with = meta.config(str(latent.path)).norm
    if made_with != model.config.norm and not force:
        raise CvaeError(f"{latent.path} was encoded with the weights' GroupNorm set to {made_with}, not "
                        f"{model.config.norm}: decode it with --norm {made_with}")
    check_compatible(meta, model_id(model), model.config, where=str(latent.path), force=force)
    check_output_kind(dst, image=meta.fps is None)
    remove_stale(dst)
    opts = _options(options, meta.width, meta.height, meta.fps is None, meta.padded_frames)
    step = max(1, opts.chunk // model.config.time_compression)
    progress, (on_tile,) = by_tiles(progress, 1 if meta.fps is None else 0, 1.0)
    chunks = decode_latents(model, latent.iter_chunks(step), opts, meta.height, meta.width, on_tile=on_tile)
    frames = _write_frames(dst, background(chunks, prefetch), meta.fps, meta.frames, crf, progress,
                           times=meta.frame_times)
    return Result(dst, frames)


# --- reconstruct ------------------------------------------------------------------------------

def reconstruct_file(model: CausalVAE, src: media.MediaFile | Path, dst: Path, options: Options,
                     select: Selection = Selection(), *, crf: int = 18, side_by_side: bool = False,
                     metrics: bool = True, progress: Progress | None = None, prefetch: int = PREFETCH) -> Result:
    """Encode and decode in one pass, scoring every output frame against its input (PSNR, SSIM of the
    frames as decoded, before the video encoder; `metrics=False` skips them); reading, the model and
    scoring + video encode run in overlapping threads (`prefetch` > 0).

    Finished work is never thrown away for a score: each chunk is scored after it was handed to the
    writer, and a scoring failure stops the scoring (`Result.metrics_error`), not the output."""
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_media_file(src))
        info = source.info
        check_output_kind(dst, image=info.is_image)
        remove_stale(dst)
        width, height = select.model_size(info)
        opts = _options(options, width, height, info.is_image, select.expected_frames(info))
        times: list = []  # the input's frame times, for the writer (kept ahead of it)
        pending: collections.deque[np.ndarray] = collections.deque()  # inputs awaiting their output
        scores = FrameMetrics() if metrics else None
        written: list[tuple[np.ndarray, np.ndarray]] = []  # the chunk handed to the writer last, to score
        failure: list[str] = []

        def remember(timed):
            for frame, t in timed:
                pending.append(frame)
                times.append(t)
                yield frame

        def score_written() -> None:
            """Score the chunk the writer has taken; a failure ends scoring, never the output."""
            while written and scores is not None and not failure:
                inputs, outputs = written.pop()
                try:
                    scores.add(frames_to_tensor(inputs), frames_to_tensor(outputs))
                except (CvaeError, RuntimeError, ValueError, MemoryError) as e:
                    failure.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
            written.clear()

        def pair(chunk: np.ndarray) -> np.ndarray:
            score_written()  # the chunk before this one is in the writer now
            chunk = chunk[: len(pending)]  # frames past the input's end decode its padding
            inputs = np.stack([pending.popleft() for _ in range(len(chunk))])
            written.append((inputs, chunk))
            return np.concatenate([inputs, chunk], axis=2) if side_by_side else chunk

        frames = stack.enter_context(contextlib.closing(background(select.timed_frames(source), prefetch)))
        def finite(chunks):
            for mean, _ in chunks:
                check_finite(mean, str(source.path))
                yield mean

        progress, (on_encode, on_decode) = by_tiles(progress, 1 if info.is_image else 0,
                                                    1 - DECODE_SHARE, DECODE_SHARE)
        latents = finite(encode_frames(model, remember(frames), opts, on_tile=on_encode))
        chunks = background(decode_latents(model, latents, opts, height, width, on_tile=on_decode), prefetch)
        keep_times = not (info.is_image or select.fps)
        count = _write_frames(dst, chunks, None if info.is_image else select.output_fps(info), 2**62, crf,
                              progress, transform=pair, times=times if keep_times else None,
                              time_base=info.time_base)
        if count == 0:
            raise CvaeError(f"{source.path}: no frames selected")
        score_written()
    return Result(dst, count, scores, failure[0] if failure else None)


# --- many inputs, one at a time ---------------------------------------------------------------

def one_by_one(jobs: Sequence[tuple[object, Path]], open_input: Callable[[object], ContextManager],
               total: Callable[[object], int | None], run: Callable[[object, Path, Options, Progress | None], Result],
               options: Options, device, progress: ProgressFactory | None = None,
               note: Callable[[str], None] | None = None) -> Iterator[tuple[int, Result | Exception]]:
    """(job index, outcome) of each (input, output) job in order: the input opened once
    (`open_input`), run with `options`, once more with a smaller cut if it runs out of memory
    (`attempt`, which reads the input afresh); an input's own failure is its outcome (`per_input`),
    anything else raises."""
    for k, (src, dst) in enumerate(jobs):
        interrupt.check()  # between inputs
        try:
            opened = open_input(src)
        except CvaeError as e:
            yield k, e
            continue
        with opened as item, progress(path_of(src).name, total(item)) if progress else \
                contextlib.nullcontext(None) as advance:
            tries = iter([item, src])
            outcome, = attempt(lambda opts: [run(next(tries), dst, opts, advance)], 1, options, str(path_of(src)),
                               device, note)
        yield k, outcome


def open_latent(src: LatentFile | str | Path) -> LatentFile:
    return src if isinstance(src, LatentFile) else LatentFile.open(src)


def open_media_file(src: media.MediaFile | str | Path) -> media.MediaFile:
    return src if isinstance(src, media.MediaFile) else media.open_media(src)


def path_of(src: str | Path | media.MediaFile | LatentFile) -> Path:
    return src.path if isinstance(src, (media.MediaFile, LatentFile)) else Path(src)
