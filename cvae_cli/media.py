"""Frames in and out of containers and images: PyAV for video, Pillow for stills. No torch here.

A frame is a numpy uint8 array (H, W, 3), RGB, upright: rotation metadata and EXIF orientation are
applied to the pixels, so callers never look at metadata. Audio and alpha are dropped. Videos are
streamed frame by frame; `open_media` opens a file once and gives its `MediaInfo` and then its
frames from the same open container.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np
from PIL import Image, ImageOps

from .atomic import atomic_path
from .errors import CvaeError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
# What VideoWriter writes, by suffix: (container format, codec). H.264 4:2:0 needs even sides, VP9 does not.
VIDEO_FORMATS = {".mp4": ("mp4", "libx264"), ".mov": ("mov", "libx264"), ".mkv": ("matroska", "libx264"),
                 ".webm": ("webm", "libvpx-vp9")}
# Pillow opens these, but they are animations, or (MPEG: a raw MPEG-1/2 video stream, .m2v) videos
# whose header Pillow reads and whose pixels it cannot: they go through PyAV as videos.
_PIL_ANIMATION_FORMATS = frozenset({"GIF", "FLI", "MPEG"})
# Container tag holding the size the caller asked for when VideoWriter padded an odd size to even.
_SIZE_TAG = "cvae_size"
_REORDER_WINDOW = 8
# Matroska and others round times to milliseconds: a frame stamped up to this much after a tick
# counts as at the tick, and the last tick must start this much before the video ends.
_TICK_SLACK = Fraction(1, 1000)
_RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class MediaInfo:
    """What a file holds. `frame_count` is the video's length in frames, found as `_length` says
    (`frames_from` tells how: "container", "packets" or "duration"); None when nothing tells. A
    damaged file may still decode fewer: the corruption rule in `MediaFile.frames` decides that."""

    path: str
    width: int  # as displayed, after rotation
    height: int
    fps: Fraction | None  # None for stills
    frame_count: int | None
    is_image: bool
    rotation: int = 0  # degrees counter-clockwise applied to the stored pixels (0, 90, 180, 270)
    time_base: Fraction | None = None  # the unit of the video's timestamps; None for stills
    codec: str | None = None  # the video codec (h264, vp9, ...), or the image format (PNG, JPEG, ...)
    frames_from: str | None = None  # how frame_count was found (see `_length`); None for stills
    claimed_frames: int | None = None  # the container's own claim, when it makes one (it may lie)


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Scale (width, height) down so the longer side is at most `max_side`, keeping the aspect
    ratio; never scales up."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def is_image(path) -> bool:
    """True for a still image. An existing file is judged by content (a .gif or an animation is a
    video, a mislabelled PNG is an image); a path that does not exist yet, by its suffix."""
    p = Path(path)
    if p.is_file():
        fmt = _pil_format(p)
        return fmt is not None and fmt not in _PIL_ANIMATION_FORMATS
    return p.suffix.lower() in IMAGE_SUFFIXES


class MediaFile:
    """An opened input: its `MediaInfo` at once, then its frames from the same open file.

    For a video the first frame is decoded on opening (it carries the rotation, and a file whose
    first frame does not decode should fail before any work starts) and handed out again by
    `frames`. Use as a context manager, or call `close`; reading all frames closes it too."""

    def __init__(self, path):
        self.path = _existing_file(path)
        self._stack = contextlib.ExitStack()
        self._decoded: Iterator | None = None
        self._read = False
        if _is_still(self.path):
            with _pil_errors(self.path), Image.open(self.path) as im:
                w, h = im.size
                if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
                    w, h = h, w
                self.info = MediaInfo(str(self.path), w, h, None, 1, True, 0, codec=im.format)
            return
        with self._stack:
            self._container, self._stream = self._stack.enter_context(_open_video(self.path))
            self._decoder = _Decoder(self.path, self._container, self._stream)
            self._stack.callback(self._release)  # runs before the container closes
            first = next(self._decoder.frames)
            self._decoded = itertools.chain([first], self._decoder.frames)
            self._crop = _crop_size(self._container, first)
            w, h = self._crop or (first.width, first.height)
            rotation = _quarter_turns(first) * 90
            if rotation in (90, 270):
                w, h = h, w
            stream = self._stream
            fps = stream.average_rate or stream.guessed_rate or None
            fps = Fraction(fps) if fps else None
            count, found = _length(self.path, self._container, stream, fps)
            self.info = MediaInfo(str(self.path), w, h, fps, count, False,
                                  rotation, Fraction(stream.time_base) if stream.time_base else None,
                                  codec=stream.codec_context.name, frames_from=found,
                                  claimed_frames=stream.frames or None)
            self._stack = self._stack.pop_all()

    def frames(self, *, start: int = 0, end: int | None = None, fps=None, size: tuple[int, int] | None = None,
               allow_partial: bool = False, box: tuple[float, float, float, float] | None = None
               ) -> Iterator[np.ndarray]:
        """The frames of `timed_frames`, without their times."""
        timed = self.timed_frames(start=start, end=end, fps=fps, size=size, allow_partial=allow_partial, box=box)
        return _untimed(timed)

    def timed_frames(self, *, start: int = 0, end: int | None = None, fps=None,
                     size: tuple[int, int] | None = None, allow_partial: bool = False,
                     box: tuple[float, float, float, float] | None = None) -> Iterator[tuple[np.ndarray, Fraction]]:
        """Yield (frame, time): upright RGB frames [start, end) (indices after resampling to `fps`
        when given), resized to `size` = (W, H) when given; `box` = (left, top, right, bottom), in
        upright pixels, is the region resized to `size` (a crop in the same resampling step); each
        with its presentation time in seconds from the first frame yielded (a variable frame rate's
        real times; k/fps after resampling). A still image yields one frame (index 0), at 0. Once
        per file.

        Corruption rule: a video is corrupt when the demuxer or decoder raises, or when fewer
        packets could be read than the container's own index lists (a file cut short). The header
        frame count alone is never evidence. Then CvaeError is raised after the frames already
        yielded, unless `allow_partial`, which stops quietly. Decoders that conceal damage silently
        are not caught. A bad argument raises at the call; problems inside the file, at iteration."""
        fps = _check_selection(start, end, fps)
        if self._read:
            raise ValueError(f"the frames of {self.path} were read already")
        self._read = True
        if self.info.is_image:
            selected = start == 0 and (end is None or end > 0)
            return iter([(_resize(_load_image(self.path), size, box), Fraction(0))] if selected else [])
        self._decoder.allow_partial = allow_partial
        return self._video_frames(start, end, fps, size, box)

    def _video_frames(self, start, end, fps, size, box=None) -> Iterator[tuple[np.ndarray, Fraction]]:
        with self:
            if end is not None and end <= start:
                return
            timed = _timed(self._decoded, self._stream)
            if fps is not None:
                timed = ((frame, k / fps) for k, frame in enumerate(_resample(timed, fps, self._stream)))
            last_frame = last_array = origin = None
            for i, (frame, t) in enumerate(timed):
                if end is not None and i >= end:
                    return
                if i < start:
                    continue
                origin = t if origin is None else origin
                if frame is last_frame:  # a repeat from resampling: same pixels, own buffer
                    yield last_array.copy(), t - origin
                    continue
                array = _to_rgb(frame, self._crop, size, box)
                last_frame, last_array = frame, array
                yield array, t - origin

    def close(self) -> None:
        self._stack.close()

    def _release(self) -> None:
        """Free the decoder now. Its generator and the decoder refer to each other, so otherwise only
        the garbage collector frees them, in whichever process it runs: in a DataLoader worker
        forked later, freeing the codec context waits forever for decoder threads that stayed behind."""
        self._decoded = None
        self._decoder.frames.close()
        self._decoder = self._container = self._stream = None

    def __enter__(self) -> "MediaFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_media(path) -> MediaFile:
    """Open a video or image: raises CvaeError for a missing, unreadable or undecodable file."""
    return MediaFile(path)


def probe(path) -> MediaInfo:
    """Size, rate, claimed length and codec of a file (see `MediaFile`)."""
    with open_media(path) as f:
        return f.info


def read_frames(path, **selection) -> Iterator[np.ndarray]:
    """The frames of a file (see `MediaFile.frames`); a missing file raises at the call."""
    _check_selection(selection.get("start", 0), selection.get("end"), selection.get("fps"))
    f = open_media(path)
    try:
        return f.frames(**selection)
    except BaseException:
        f.close()
        raise


def is_constant_rate(times: Sequence[Fraction], fps: Fraction, tolerance: Fraction) -> bool:
    """Whether frame times sit on the grid k/fps, each within `tolerance` (a timestamp tick)."""
    return all(abs(t - k / fps) <= tolerance for k, t in enumerate(times))


class VideoWriter:
    """Video writer, container and codec by suffix (`VIDEO_FORMATS`): .mp4/.mov/.mkv hold H.264
    (libx264, yuv420p), .webm holds VP9 (libvpx-vp9, yuv420p). The file appears at `path` only
    when the `with` ends without an exception.

    Odd sizes: 4:2:0 H.264 cannot code an odd width or height, so the frame is padded to even by
    repeating its last column/row, and the asked-for size is stored in a container tag that
    `MediaFile` uses to crop back: our own round trip keeps the exact size, other players show one
    repeated edge column or row. VP9 codes any size: .webm keeps it for every player. Colours are
    converted with BT.709 (limited range) and the stream is tagged so, which is what players
    assume for HD and what `MediaFile` honours.
    """

    def __init__(self, path, fps, width: int, height: int, crf: int = 18, preset: str = "medium",
                 times: Sequence[Fraction] | None = None, time_base: Fraction | None = None):
        self.path = Path(path)
        self.format, self.codec = video_format(self.path)
        self.fps = _fraction(fps)
        self.width, self.height = int(width), int(height)
        even = self.codec == "libx264"
        self.coded_width, self.coded_height = self.width + even * self.width % 2, self.height + even * self.height % 2
        self.crf, self.preset = crf, preset
        # a variable frame rate: frame k is shown at times[k] seconds, in ticks of time_base (the
        # list may still be growing while frames are written); past its end, 1/fps apart
        self.times = times
        if times is not None and not time_base:  # the coarsest tick that states every time exactly
            time_base = Fraction(1, math.lcm(*(Fraction(t).denominator for t in times)) if times else 1)
        self.time_base = Fraction(time_base) if times is not None else 1 / self.fps
        self.frames_written = 0
        self._last_pts = -1
        self._stack = contextlib.ExitStack()
        self._container = self._stream = None

    def __enter__(self) -> "VideoWriter":
        if self.width < 1 or self.height < 1 or self.fps <= 0:
            raise ValueError(f"bad video size or rate: {self.width}x{self.height} @ {self.fps}")
        with self._stack:
            tmp = self._stack.enter_context(atomic_path(self.path))
            with self._av_errors():
                opts = {"movflags": "use_metadata_tags"} if self.format in ("mp4", "mov") else {}
                self._container = av.open(str(tmp), "w", format=self.format, options=opts)
                self._stack.push(self._close_container)
                if (self.coded_width, self.coded_height) != (self.width, self.height):
                    self._container.metadata[_SIZE_TAG] = f"{self.width}x{self.height}"
                s = self._container.add_stream(self.codec, rate=self.fps)
                s.width, s.height, s.pix_fmt = self.coded_width, self.coded_height, "yuv420p"
                if self.times is not None:
                    s.codec_context.time_base = s.time_base = self.time_base
                cc = s.codec_context
                cc.colorspace = cc.color_primaries = cc.color_trc = 1  # BT.709
                cc.color_range = 1  # limited ("tv")
                s.options = ({"crf": str(self.crf), "preset": self.preset} if self.codec == "libx264" else
                             {"crf": str(self.crf), "b:v": "0", "deadline": "good", "cpu-used": "4"})
                self._stream = s
            self._stack = self._stack.pop_all()
        return self

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 frame of shape {(self.height, self.width, 3)}, "
                             f"got {frame.dtype} {frame.shape}")
        pad_h, pad_w = self.coded_height - self.height, self.coded_width - self.width
        if pad_h or pad_w:
            frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf = vf.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range=1)
        vf.pts, vf.time_base = self._next_pts(), self.time_base
        with self._av_errors():
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
        self.frames_written += 1

    def _next_pts(self) -> int:
        k, times = self.frames_written, self.times
        if times is not None and k < len(times):
            t = times[k]
        else:
            t = (times[-1] + (k - len(times) + 1) / self.fps) if times else k / self.fps
        self._last_pts = max(round(t / self.time_base), self._last_pts + 1)  # H.264 needs increasing
        return self._last_pts

    def __exit__(self, exc_type, exc, tb):
        # The stack closes the container, then renames the temp file (or removes it on error).
        if exc_type is not None:
            return self._stack.__exit__(exc_type, exc, tb)
        with self._stack:
            if self.frames_written == 0:
                raise CvaeError(f"no frames to write to {self.path}")
            with self._av_errors():
                for packet in self._stream.encode(None):
                    self._container.mux(packet)

    def _close_container(self, exc_type, exc, tb) -> bool:
        try:
            self._container.close()  # writes the trailer
        except (av.error.FFmpegError, OSError) as e:
            if exc_type is None:  # on the error path the first error is the one to report
                raise CvaeError(f"cannot write {self.path}: {e}") from None
        return False

    @contextlib.contextmanager
    def _av_errors(self):
        try:
            yield
        except (av.error.FFmpegError, OSError) as e:
            raise CvaeError(f"cannot write {self.path}: {e}") from None


def video_format(path) -> tuple[str, str]:
    """(container format, codec) for a video file name; CvaeError for a suffix we do not write."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise CvaeError(f"{path}: cannot write a video named {suffix or 'without a suffix'} "
                        f"(use {', '.join(VIDEO_FORMATS)})")
    return VIDEO_FORMATS[suffix]


def write_image(path, frame: np.ndarray) -> None:
    """Write one RGB frame as png / jpg / webp / bmp / tiff (by suffix), atomically."""
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
           ".tif": "TIFF", ".tiff": "TIFF"}.get(path.suffix.lower())
    if fmt is None:
        raise CvaeError(f"{path}: unknown image type (use one of {', '.join(sorted(IMAGE_SUFFIXES))})")
    image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8), "RGB")
    opts = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    with atomic_path(path) as tmp:
        try:
            image.save(tmp, format=fmt, **opts)
        except OSError as e:
            raise CvaeError(f"cannot write {path}: {e}") from None


# ---------------------------------------------------------------- internals

def _existing_file(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CvaeError(f"no such file: {p}")
    if not p.is_file():
        raise CvaeError(f"{p} is not a file")
    return p


def _is_still(p: Path) -> bool:
    if is_image(p):
        return True
    if p.suffix.lower() in IMAGE_SUFFIXES:  # named like an image, Pillow cannot read it
        raise CvaeError(f"{p} is not an image or video PyAV/Pillow can read")
    return False


def _check_selection(start: int, end: int | None, fps) -> Fraction | None:
    fps = None if fps is None else _fraction(fps)
    if start < 0 or (end is not None and end < 0) or (fps is not None and fps <= 0):
        raise ValueError(f"bad selection: start={start} end={end} fps={fps}")
    return fps


def _fraction(x) -> Fraction:
    return Fraction(str(x)) if isinstance(x, float) else Fraction(x)


def _pil_format(p: Path) -> str | None:
    try:
        with Image.open(p) as im:
            return im.format
    except Image.DecompressionBombError as e:
        raise CvaeError(f"{p}: {e}") from None
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        return None


@contextlib.contextmanager
def _pil_errors(p: Path):
    try:
        yield
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CvaeError(f"{p}: image is corrupt or truncated ({e})") from None


def _load_image(p: Path) -> np.ndarray:
    with _pil_errors(p), Image.open(p) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 16/32-bit grey: convert("RGB") would clip, so scale
            grey = np.clip(np.rint(np.asarray(im, np.float64) / 257), 0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        if im.mode in ("P", "PA"):  # palette transparency goes through RGBA, as Pillow asks
            im = im.convert("RGBA")
        return np.array(im.convert("RGB"))


@contextlib.contextmanager
def _open_video(p: Path):
    try:
        container = av.open(str(p), metadata_errors="replace")
    except PermissionError:
        raise CvaeError(f"cannot read {p}: permission denied") from None
    except (av.error.FFmpegError, OSError, ValueError):
        raise CvaeError(f"{p} is not an image or video PyAV/Pillow can read") from None
    try:
        streams = [s for s in container.streams.video
                   if not s.disposition & av.stream.Disposition.attached_pic]  # cover art in audio files
        if not streams:
            raise CvaeError(f"{p} has no video stream")
        # Default (slice) threading: frame threads were no faster here on 2 cores, and they can
        # swallow decoder errors and the frames held before them in a damaged file.
        yield container, streams[0]
    finally:
        container.close()


def _length(p: Path, container, stream, fps: Fraction | None) -> tuple[int | None, str | None]:
    """The number of frames, and how it was found. Many containers state no length (MPEG program
    and transport streams, y4m, Matroska, raw streams: PyAV says 0) and some state a wrong one
    (opencv's tree.avi claims 444 frames where its index lists, and its decoder gives, 68). So the
    claim is trusted only where the container's own index lists exactly as many frames (mp4/mov,
    a sound avi); otherwise the video's packets are counted by demuxing the file once more, without
    decoding (a frame a packet: exact for what the demuxer sees, and cheap: reading, no decoding).
    Only where no packet can be read is the length estimated, from the claim, else duration x rate."""
    claim = stream.frames
    if claim > 0 and len(stream.index_entries) == claim:
        return claim, "container"
    counted = _count_packets(p, stream.index)
    if counted:
        return counted, "packets"
    if claim > 0:
        return claim, "container"
    if stream.duration and stream.time_base:
        seconds = stream.duration * stream.time_base
    elif container.duration:
        seconds = Fraction(container.duration, av.time_base)
    else:
        return None, None
    return (max(1, round(seconds * fps)), "duration") if fps else (None, None)


def _count_packets(p: Path, index: int) -> int:
    """Video packets with data in the stream at `index`, read from a fresh opening of the file (the
    caller's container keeps its place); on damage, the packets before it."""
    count = 0
    try:
        with av.open(str(p), metadata_errors="replace") as container:
            stream = container.streams[index]
            for packet in container.demux(stream):
                if packet.size and not packet.is_discard:
                    count += 1
    except (av.error.FFmpegError, OSError):
        pass
    return count


class _Decoder:
    """Decoded frames in display order (`frames`); raises per the corruption rule in
    `MediaFile.frames`, whose `allow_partial` may be set after the first frame was taken."""

    def __init__(self, p: Path, container, stream):
        self.p, self.container, self.stream = p, container, stream
        self.allow_partial = True  # while the first frame is decoded for the info
        self.frames = self._frames()

    def _frames(self) -> Iterator[av.VideoFrame]:
        p, stream = self.p, self.stream
        packets = frames = 0
        try:
            for packet in self.container.demux(stream):
                if packet.size:
                    packets += 1
                for frame in packet.decode():
                    frames += 1
                    yield frame
            broken = packets < len(stream.index_entries)
        except av.error.FFmpegError:
            broken = True
            try:  # the frames the decoder still holds came before the damage
                for frame in stream.decode(None):
                    frames += 1
                    yield frame
            except av.error.FFmpegError:
                pass
        if frames == 0:
            raise CvaeError(f"{p}: video is corrupt or truncated, no frame could be decoded" if broken
                            else f"{p}: video has no frames")
        if broken and not self.allow_partial:
            raise CvaeError(f"{p}: video is corrupt or truncated after {frames} frames "
                            "(use --allow-partial to keep them)")


def _untimed(timed: Iterator[tuple[np.ndarray, Fraction]]) -> Iterator[np.ndarray]:
    try:
        for frame, _ in timed:
            yield frame
    finally:  # closing this closes the decode now, not when the collector gets to it
        close = getattr(timed, "close", None)
        if close is not None:
            close()


def _frame_step(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return 1 / Fraction(rate) if rate else Fraction(1, 25)


def _timed(frames, stream) -> Iterator[tuple[av.VideoFrame, Fraction]]:
    """Frames with presentation times in seconds, non-decreasing. Some AVIs with B-frames hand out
    frames in display order but stamped with their packets' times (1, 2, 3, 5, 4, ...); within a
    small window the k-th frame out gets the k-th smallest time. Missing pts: previous + 1/rate."""
    tb, step = stream.time_base, _frame_step(stream)
    times: list[Fraction] = []
    queue: deque = deque()
    latest = None
    for frame in frames:
        if frame.pts is not None:
            t = frame.pts * tb
        else:
            t = Fraction(0) if latest is None else latest + step
        latest = t if latest is None else max(latest, t)
        heapq.heappush(times, t)
        queue.append(frame)
        if len(queue) > _REORDER_WINDOW:
            yield queue.popleft(), heapq.heappop(times)
    while queue:
        yield queue.popleft(), heapq.heappop(times)


def _resample(timed, fps: Fraction, stream) -> Iterator[av.VideoFrame]:
    """For each tick k/fps after the first frame's time, the latest frame at or before it (so frames
    are repeated or dropped by timestamp, not by nominal rate); ticks run to the end of the last
    frame (its duration, else 1/rate), both up to `_TICK_SLACK`."""
    k, prev, origin, prev_t = 0, None, Fraction(0), Fraction(0)
    for frame, t in timed:
        if prev is None:
            origin = t
        while prev is not None and origin + k / fps + _TICK_SLACK < t:
            yield prev
            k += 1
        prev, prev_t = frame, t
    if prev is None:
        return
    end = prev_t + (prev.duration * stream.time_base if prev.duration else _frame_step(stream))
    while origin + k / fps + _TICK_SLACK < end:
        yield prev
        k += 1


def _crop_size(container, frame) -> tuple[int, int] | None:
    """The size VideoWriter asked for before padding to even, if this file carries its tag."""
    tag = next((v for k, v in container.metadata.items() if k.lower() == _SIZE_TAG), None)
    try:
        w, h = (int(x) for x in tag.split("x"))
    except (AttributeError, ValueError):
        return None
    ok = 0 <= frame.width - w <= 1 and 0 <= frame.height - h <= 1 and w > 0 and h > 0
    return (w, h) if ok else None


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that make the frame upright (display-matrix flips and
    non-multiples of 90 degrees are rounded away)."""
    return round(frame.rotation / 90) % 4


def _to_rgb(frame, crop, size, box=None) -> np.ndarray:
    array = frame.to_ndarray(format="rgb24", src_color_range=frame.color_range)
    if crop:
        array = array[: crop[1], : crop[0]]
    turns = _quarter_turns(frame)
    if turns:
        array = np.rot90(array, turns)
    return _resize(np.ascontiguousarray(array), size, box)


def _resize(array: np.ndarray, size, box=None) -> np.ndarray:
    whole = (0, 0, array.shape[1], array.shape[0])
    if size is None or ((array.shape[1], array.shape[0]) == tuple(size) and (box is None or tuple(box) == whole)):
        return array
    w, h = (int(x) for x in size)
    if w < 1 or h < 1:
        raise ValueError(f"bad size {size}")
    return np.array(Image.fromarray(array).resize((w, h), _RESAMPLE, box=None if box is None else tuple(box)))
