"""The `Tokenizer`: weights, device, dtype and speed options resolved once, the policy for how to
cut an input, and the jobs every command runs: a video or image in, a latent file out, and back,
without holding a video; and the same in memory, for frames a caller already holds.

    from cvae_cli import Tokenizer
    tok = Tokenizer.load()                              # the default weights, auto device and dtype
    tok.encode("clip.mp4")                              # -> clip.safetensors
    tok.decode("clip.safetensors")                      # -> clip.decoded.mp4

container -> `media` frames -> `stream` chunks through the model -> `latents` file, and the mirror
image. `reconstruct` chains both in memory and scores the result against its input as it goes.
Inputs are opened once (`media.MediaFile`, `latents.LatentFile`) and passed along opened. Each job
reports progress as a count of frames through the model, through an optional callback. Many inputs
follow one failure policy (`per_input`): an input's own failure is its outcome, anything else ends
the run.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import queue
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
from .checkpoints import default_weights, load_model, model_id
from .device import dtype_name, is_cuda, placement, resolve
from .errors import CvaeError
from .latents import LatentFile, LatentMeta, LatentWriter, check_compatible
from .metrics import FrameMetrics, frames_to_tensor
from .model import CausalVAE, CausalVAEConfig, DiagonalGaussian
from .outputs import decoded_name, latent_name, recon_name, refuse_unsafe
from .stream import (DEFAULT_CHUNK, MODES, StreamOptions, choose_options, decode_latents, encode_batch, encode_frames,
                     exact_streaming, padded_length, padded_size)

Progress = Callable[[int], None]
# (name, expected frames or None) -> a context giving the Progress callback for one batch of inputs
ProgressFactory = Callable[[str, "int | None"], ContextManager[Progress]]
# How to cut an input of a given (width, height, is an image): fixed, or chosen per input (see
# stream.choose_options).
Options = StreamOptions | Callable[[int, int, bool], StreamOptions]
PREFETCH = 2  # items a background stage may run ahead of its consumer (bounds memory)


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


# --- threads ----------------------------------------------------------------------------------

def background(items: Iterable, depth: int = PREFETCH) -> Iterator:
    """Iterate `items` in a thread, up to `depth` ahead, so container decode and colour conversion,
    the model's GPU work, and mp4 encode/latent writes overlap instead of taking turns.

    The producer's exception is re-raised here, in the consumer, unchanged; a consumer that stops
    early (or fails, or is interrupted) stops the producer, closes its generator and waits for the
    thread, so no thread outlives its consumer. Close this generator (`contextlib.closing`) when
    not reading it to the end. depth 0 runs inline."""
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
            try:
                item, error = slots.get(timeout=0.1)
            except queue.Empty:
                interrupt.check()  # the producer may be busy for long: the consumer stops as asked
                continue
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # a second Ctrl-C must not leave the thread running at exit
            with contextlib.suppress(KeyboardInterrupt):
                thread.join()


# --- what to read -------------------------------------------------------------------------------

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


def _opened(source: media.MediaFile | Path, stack: contextlib.ExitStack) -> media.MediaFile:
    return stack.enter_context(source if isinstance(source, media.MediaFile) else media.open_media(source))


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

    def advance(run: _Encoding, latents: int) -> None:
        """Report the frames these latents stand for (1, then 4 per latent), at most those read."""
        run.latents += latents
        done = min(1 + ft * (run.latents - 1), run.read)
        if progress and done > run.counted:
            progress(done - run.counted)
        run.counted = max(run.counted, done)

    with contextlib.ExitStack() as stack:
        for src, dst, select in jobs:
            try:
                run = _Encoding(_opened(src, stack), dst, select)
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
        chunks = encode_batch(model, streams, opts)
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


def _stored(mean: torch.Tensor, logvar: torch.Tensor, seed: int | None, first_frame: int) -> torch.Tensor:
    """What a latent file keeps of a chunk of the posterior: its mean, or with `seed` a sample whose
    noise depends on the seed and the latent frame only (`DiagonalGaussian.sample`)."""
    if seed is None:
        return mean
    return DiagonalGaussian(mean[None].float(), logvar[None].float()).sample(seed=seed, first_frame=first_frame)[0]


def _latent_chunks(latents: torch.Tensor | LatentFile, options: StreamOptions, model: CausalVAE) -> Iterable:
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
    chunks = decode_latents(model, latent.iter_chunks(step), opts, meta.height, meta.width)
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
        source = _opened(src, stack)
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

        latents = finite(encode_frames(model, remember(frames), opts))
        chunks = background(decode_latents(model, latents, opts, height, width), prefetch)
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
        with opened as item, progress(_path(src).name, total(item)) if progress else \
                contextlib.nullcontext(None) as advance:
            tries = iter([item, src])
            outcome, = attempt(lambda opts: [run(next(tries), dst, opts, advance)], 1, options, str(_path(src)),
                               device, note)
        yield k, outcome


def _open_latent(src: LatentFile | str | Path) -> LatentFile:
    return src if isinstance(src, LatentFile) else LatentFile.open(src)


def _open_media(src: media.MediaFile | str | Path) -> media.MediaFile:
    return src if isinstance(src, media.MediaFile) else media.open_media(src)


# --- the cut policy ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Cut:
    """How inputs are cut for the model, as asked; what is left `auto` (mode "auto", chunk None,
    tile "auto") is chosen per frame size by `stream.choose_options`, within `memory_budget`
    (bytes) when one is given. A cut StreamOptions refuses is refused here, before any weights load."""

    mode: str = "auto"
    chunk: int | None = None
    tile: int | str | None = "auto"  # "auto", None (whole frames) or a tile side in pixels
    memory_budget: int | None = None

    def __post_init__(self):
        if self.mode not in ("auto", *MODES):
            raise CvaeError(f"--mode {self.mode}: use auto, {', '.join(MODES)}")
        try:
            StreamOptions(chunk=self.chunk or DEFAULT_CHUNK, tile=self.tile if isinstance(self.tile, int) else None)
        except ValueError as e:
            raise CvaeError(str(e)) from None

    def options(self, config: CausalVAEConfig, width: int, height: int, image: bool = False) -> StreamOptions:
        budget = {} if self.memory_budget is None else {"memory_budget": self.memory_budget}
        try:
            return choose_options(config, width, height, self.mode, self.chunk, self.tile, image, **budget)
        except ValueError as e:
            raise CvaeError(str(e)) from None


def _selection(select: Selection | None, fields: dict) -> Selection:
    if select is not None and fields:
        raise TypeError("pass either select= or the selection's fields, not both")
    return select if select is not None else Selection(**fields)


def _path(src: str | Path | media.MediaFile | LatentFile) -> Path:
    return src.path if isinstance(src, (media.MediaFile, LatentFile)) else Path(src)


def _target(src: Path, dst: Path | str | None, name: str, overwrite: bool) -> Path:
    """Where a job writes: `dst`, or `name` beside the input; never the input itself, and never an
    existing file unless `overwrite`."""
    dst = Path(dst) if dst is not None else src.parent / name
    refuse_unsafe([(src, dst)])
    if dst.exists() and not overwrite:
        raise CvaeError(f"{dst} exists: pass overwrite=True to replace it")
    return dst


def _policy(model: CausalVAE, cut: Cut, direction: str, warn: Callable[[str], None]) -> Policy:
    """The cut for each input: the one asked for, the rest the largest that fits the memory budget
    (`cut.memory_budget` bytes, else what the device has free) for `direction`'s peak."""
    from .budget import Budget, default_budget

    device, dtype = placement(model)
    cuda = is_cuda(device)
    budget = Budget(cut.memory_budget, direction, cuda) if cut.memory_budget is not None else \
        default_budget(device, model, direction) or Budget(2**62, direction, cuda, "unknown")
    return Policy(model.config, dtype, model.levers, budget, cut.mode, cut.chunk, cut.tile, warn=warn)


# --- the tokenizer ----------------------------------------------------------------------------

class Tokenizer:
    """A loaded model and the cut asked for: what encode, decode, reconstruct and the dataset
    runner all work through. `notes` and `warnings` say what loading chose on the user's behalf
    (the built-in model) or what will not work as they may expect (streaming a clip-norm model)."""

    def __init__(self, model: CausalVAE, cut: Cut = Cut(), notes: Sequence[str] = (), warnings: Sequence[str] = (),
                 policy: Policy | None = None):
        self.model, self.cut = model, cut
        self.notes, self.warnings = list(notes), list(warnings)
        self.policy = policy or _policy(model, cut, "reconstruct", self.warnings.append)

    @classmethod
    def load(cls, weights: str | Path | None = None, device: str | torch.device = "auto",
             dtype: str | torch.dtype = "auto", norm: str | None = None, fast: bool = False, compile: bool = False,
             mode: str = "auto", chunk: int | None = None, tile: int | str | None = "auto",
             memory_budget: int | None = None, *, local_rank: int | None = None,
             direction: str = "reconstruct", on_warning: Callable[[str], None] | None = None) -> Tokenizer:
        """Weights: a cvae .safetensors, an Open-Sora-Plan folder or hub id; None: the SD VAE
        `cvae inflate` made, else the built-in small model (said in `notes`). `device`/`dtype` auto:
        CUDA and bf16 when a GPU is visible, else the CPU in fp32. `norm` overrides the weights'
        GroupNorm (frame streams exactly); `fast` and `compile` are the speed levers proven equal to
        the plain model. `mode`, `chunk`, `tile`, `memory_budget`: how inputs are cut (`Cut`);
        `direction` (encode, decode or reconstruct): whose peak the budget holds. Warnings, now and
        while inputs run (a cut asked for that does not fit), go to `on_warning`, else to `warnings`."""
        cut = Cut(mode, chunk, tile, memory_budget)
        place, precision = resolve(device, dtype, local_rank)
        notes: list[str] = []
        warnings: list[str] = []
        warn = on_warning or warnings.append
        if place.type == "cpu" and precision == torch.float16:
            warn("--dtype fp16 on the CPU is about 20x slower than fp32 (the CPU has no fast fp16 kernels); "
                 "leave --dtype auto")
        if fast and not is_cuda(place):  # its levers are GPU ones: on a CPU the fused norm recompiles per shape
            warn("--fast does nothing on the CPU (fused GroupNorm+SiLU and cuDNN autotuning are GPU "
                 "levers; on a CPU the fused norm is compiled anew for each shape and runs slower)")
            fast = False
        if weights is None:
            weights, builtin = default_weights()
            if builtin:
                notes.append("using the built-in small model (cvae-small, trained on a CPU); "
                             "`cvae inflate` makes the better Stable Diffusion one")
        model = load_model(weights, norm=norm, device=place, dtype=precision)
        if fast or compile:
            from .accel import speed_up

            speed_up(model, fast=fast, compile=compile)
        if cut.mode == "stream" and not exact_streaming(model.config):
            warn("--mode stream only approximates this model (its norm or attention spans the whole "
                 "clip); --mode auto cuts it as Open-Sora-Plan does")
        return cls(model, cut, notes, warnings, _policy(model, cut, direction, warn))

    @property
    def device(self) -> torch.device:
        return placement(self.model)[0]

    @property
    def dtype(self) -> torch.dtype:
        return placement(self.model)[1]

    @property
    def model_id(self) -> str:
        return model_id(self.model)

    def options(self, width: int, height: int, image: bool = False, frames: int | None = None) -> StreamOptions:
        """How an input of this frame size is cut: what the cut fixes, the rest what fits the memory
        budget (`budget.Policy`)."""
        return self.policy(width, height, image, frames=frames)

    # file to file ----------------------------------------------------------------------------

    def encode(self, src: str | Path | media.MediaFile, dst: str | Path | None = None, *, select: Selection | None = None,
               seed: int | None = None, save_logvar: bool = False, overwrite: bool = False,
               progress: Progress | None = None, **selection) -> Result:
        """A video or image -> a latent file (default: X.safetensors beside X). `selection`: the
        fields of `Selection` (start, end, fps, size, max_side, allow_partial); `seed` stores a
        posterior sample instead of its mean."""
        path = _path(src)
        dst = _target(path, dst, latent_name(path), overwrite)
        return encode_file(self.model, src, dst, self.policy, _selection(select, selection), seed=seed,
                           save_logvar=save_logvar, progress=progress)

    def encode_many(self, jobs: Sequence[tuple[Path, Path, Selection]], *, batch_size: int = 1,
                    seed: int | None = None, save_logvar: bool = False, progress: ProgressFactory | None = None,
                    note: Callable[[str], None] | None = None) -> Iterator[tuple[int, Result | Exception]]:
        """(job index, outcome) of many (input, output, selection) jobs, `batch_size` of one size at a
        time; an input's own failure is its outcome (`per_input`)."""
        return encode_many(self.model, jobs, self.policy, batch_size=batch_size, seed=seed,
                           save_logvar=save_logvar, progress=progress, note=note)

    def decode_many(self, jobs: Sequence[tuple[str | Path | LatentFile, Path]], *, crf: int = 18,
                    force: bool = False, progress: ProgressFactory | None = None,
                    note: Callable[[str], None] | None = None) -> Iterator[tuple[int, Result | Exception]]:
        """(job index, outcome) of many (latent, output) jobs, one at a time; an input's own failure
        is its outcome (`per_input`)."""
        return one_by_one(jobs, _open_latent, lambda latent: latent.meta.frames,
                          lambda latent, dst, opts, advance: decode_file(self.model, latent, dst, opts, crf=crf,
                                                                         force=force, progress=advance),
                          self.policy, self.device, progress, note)

    def reconstruct_many(self, jobs: Sequence[tuple[str | Path | media.MediaFile, Path]], *,
                         select: Selection = Selection(), crf: int = 18, side_by_side: bool = False,
                         metrics: bool = True, progress: ProgressFactory | None = None,
                         note: Callable[[str], None] | None = None) -> Iterator[tuple[int, Result | Exception]]:
        """(job index, outcome) of many (input, output) reconstructions, one at a time; an input's
        own failure is its outcome (`per_input`)."""
        return one_by_one(jobs, _open_media, lambda source: select.expected_frames(source.info),
                          lambda source, dst, opts, advance: reconstruct_file(
                              self.model, source, dst, opts, select, crf=crf, side_by_side=side_by_side,
                              metrics=metrics, progress=advance),
                          self.policy, self.device, progress, note)

    def decode(self, latent: str | Path | LatentFile, dst: str | Path | None = None, *, crf: int = 18,
               force: bool = False, overwrite: bool = False, progress: Progress | None = None) -> Result:
        """A latent file -> a video at its original size and rate (an image's -> an image);
        default X.decoded.mp4 / X.decoded.png beside it. `force` waives the weights' identity."""
        with contextlib.ExitStack() as stack:
            if not isinstance(latent, LatentFile):
                latent = stack.enter_context(LatentFile.open(latent))
            dst = _target(latent.path, dst, decoded_name(latent.path, latent.meta.fps is None), overwrite)
            return decode_file(self.model, latent, dst, self.policy, crf=crf, force=force, progress=progress)

    def reconstruct(self, src: str | Path | media.MediaFile, dst: str | Path | None = None, *,
                    select: Selection | None = None, crf: int = 18, side_by_side: bool = False, metrics: bool = True,
                    overwrite: bool = False, progress: Progress | None = None, **selection) -> Result:
        """Encode and decode in one pass (default X.recon.mp4 / X.recon.png beside X); the
        result's `metrics` hold the PSNR and SSIM of every frame against its input (unless
        `metrics` is False; `metrics_error` says why scoring stopped, the output written all the same)."""
        path = _path(src)
        dst = _target(path, dst, recon_name(path, media.is_image(path)), overwrite)
        return reconstruct_file(self.model, src, dst, self.policy, _selection(select, selection), crf=crf,
                                side_by_side=side_by_side, metrics=metrics, progress=progress)

    # in memory -------------------------------------------------------------------------------

    def encode_frames(self, frames: Iterable[np.ndarray], *, seed: int | None = None) -> torch.Tensor:
        """uint8 RGB frames (T, H, W, 3), or any iterable of (H, W, 3) frames -> the latent
        (C, 1 + (T-1)/4 rounded up, H/8, W/8) in float32 on the CPU: the posterior mean, or with
        `seed` a sample (the same as `encode` stores)."""
        it = iter(frames)
        first = next(it, None)
        if first is None:
            raise CvaeError("no frames to encode")
        rest = list(itertools.islice(it, 1))
        options = self.options(first.shape[1], first.shape[0], image=not rest)
        chunks, done = [], 0
        for mean, logvar in encode_frames(self.model, itertools.chain([first], rest, it), options):
            latent = _stored(mean, logvar, seed, done)
            chunks.append(latent.float().cpu())
            done += mean.shape[1]
        return torch.cat(chunks, dim=1)

    def decode_latent(self, latent: torch.Tensor, frames: int | None = None, height: int | None = None,
                      width: int | None = None) -> np.ndarray:
        """A latent (C, T', h, w) -> uint8 RGB frames (frames, height, width, 3): by default all
        1 + 4(T'-1) frames at 8x its size (pass the original count and size to crop the padding)."""
        c, t, h, w = latent.shape
        ft, fs = self.model.config.time_compression, self.model.config.space_compression
        height, width = height or h * fs, width or w * fs
        options = self.options(width, height, image=t == 1)
        chunks = decode_latents(self.model, _latent_chunks(latent, options, self.model), options, height, width)
        out = np.concatenate(list(chunks))
        return out[: frames or 1 + ft * (t - 1)]


def recorded_norm(latents: Iterable[LatentFile]) -> str | None:
    """The GroupNorm the latents were made with (`encode --norm` changes it), when they agree:
    decode runs the weights with it unless told otherwise, so the latents decode as they were made."""
    norms = {latent.meta.config(str(latent.path)).norm for latent in latents}
    return norms.pop() if len(norms) == 1 else None
