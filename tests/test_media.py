"""cvae_cli.media: probing, streaming reads, resampling, writers and one-line errors, on small
videos made here with PyAV."""
from __future__ import annotations

import ast
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
from PIL import Image

from cvae_cli import media
from cvae_cli.errors import CvaeError
from cvae_cli.media import MediaInfo, VideoWriter, fit_size, is_image, probe, read_frames, write_image


def pattern(i: int, w: int, h: int) -> np.ndarray:
    """Smooth, frame-dependent content that survives lossy coding and tells frames apart."""
    y, x = np.mgrid[0:h, 0:w]
    f = np.empty((h, w, 3), np.uint8)
    f[..., 0] = (x * 255 // max(w - 1, 1)).astype(np.uint8)
    f[..., 1] = (y * 255 // max(h - 1, 1)).astype(np.uint8)
    f[..., 2] = (i * 7) % 256
    f[: h // 4, : w // 4] = (255, 0, 0)  # a marker corner: shows rotations
    return f


def make_video(path, frames, rate=24, codec="libx264", pix_fmt="yuv420p", options=None,
               container_options=None, pts=None, time_base=None, rotation=None):
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if options:
            s.options = options
        if time_base is not None:
            s.codec_context.time_base = time_base
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts = i if pts is None else pts[i]
            if time_base is not None:
                f.time_base = time_base
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return Path(path)


def lossless(path, frames, rate=24, **kw):
    return make_video(path, frames, rate, codec="ffv1", pix_fmt="bgr0", **kw)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    a = [pattern(i, 64, 48) for i in range(33)]
    b = [pattern(i, 94, 70) for i in range(33)]
    return SimpleNamespace(
        a=a, b=b,
        a_mp4=make_video(d / "a.mp4", a, 24, options={"crf": "0"}, pix_fmt="yuv444p"),
        a_mkv=lossless(d / "a.mkv", a, 24),
        b_mp4=make_video(d / "b.mp4", b, Fraction(30000, 1001), options={"crf": "18"}),
        b_mkv=lossless(d / "b.mkv", b, Fraction(30000, 1001)),
    )


def mad(x, y) -> float:
    return float(np.abs(x.astype(np.int16) - y.astype(np.int16)).mean())


# ------------------------------------------------------------------ probe and read

def test_media_does_not_import_torch():
    tree = ast.parse(Path(media.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in names


def test_probe_video(clips):
    info = probe(clips.a_mp4)
    with av.open(str(clips.a_mp4)) as c:  # the muxer picks the time base: ask the file, not one FFmpeg build
        time_base = Fraction(c.streams.video[0].time_base)
    assert info == MediaInfo(str(clips.a_mp4), 64, 48, Fraction(24), 33, False, 0, time_base, "h264", "container", 33)
    info = probe(clips.b_mp4)
    assert (info.width, info.height, info.fps, info.frame_count) == (94, 70, Fraction(30000, 1001), 33)
    assert isinstance(info.fps, Fraction) and not info.is_image
    info = probe(clips.b_mkv)  # matroska does not announce a count: it is counted
    assert (info.frame_count, info.frames_from, info.claimed_frames) == (33, "packets", None)


def test_read_lossless_round_trip(clips):
    out = list(read_frames(clips.b_mkv))
    assert len(out) == 33
    for got, want in zip(out, clips.b):
        assert got.dtype == np.uint8 and got.shape == (70, 94, 3)
        np.testing.assert_array_equal(got, want)


def test_read_h264_close(clips):
    out = list(read_frames(clips.a_mp4))
    assert len(out) == 33
    assert max(mad(g, w) for g, w in zip(out, clips.a)) < 2.0
    out = list(read_frames(clips.b_mp4))
    assert len(out) == 33 and out[0].shape == (70, 94, 3)
    assert max(mad(g, w) for g, w in zip(out, clips.b)) < 4.0


def test_start_end(clips):
    out = list(read_frames(clips.a_mkv, start=5, end=12))
    assert len(out) == 7
    for got, want in zip(out, clips.a[5:12]):
        np.testing.assert_array_equal(got, want)
    assert len(list(read_frames(clips.a_mkv, start=30))) == 3
    assert list(read_frames(clips.a_mkv, start=40)) == []
    assert list(read_frames(clips.a_mkv, start=4, end=4)) == []


def test_fps_halving_picks_every_other_frame(clips):
    out = list(read_frames(clips.a_mkv, fps=12))
    assert len(out) == 17  # 33 frames of 1/24 s = 1.375 s; ticks at k/12 < 1.375
    for got, want in zip(out, clips.a[::2]):
        np.testing.assert_array_equal(got, want)
    sel = list(read_frames(clips.a_mkv, fps=12, start=3, end=6))
    for got, want in zip(sel, clips.a[6:12:2]):
        np.testing.assert_array_equal(got, want)


def test_fps_same_rate_is_identity_and_doubling_repeats(clips):
    same = list(read_frames(clips.b_mkv, fps=Fraction(30000, 1001)))
    assert len(same) == 33 and all(np.array_equal(g, w) for g, w in zip(same, clips.b))
    double = list(read_frames(clips.a_mkv, fps=48, end=8))
    for k, got in enumerate(double):
        np.testing.assert_array_equal(got, clips.a[k // 2])
    double[0][:] = 0  # a repeated frame is its own buffer
    assert double[1].any()


def test_fps_uses_timestamps_not_nominal_rate(tmp_path):
    frames = [pattern(i, 32, 24) for i in range(6)]
    times_ms = [0, 100, 150, 420, 430, 700]  # variable frame rate
    path = lossless(tmp_path / "vfr.mkv", frames, 10, pts=times_ms, time_base=Fraction(1, 1000))
    out = list(read_frames(path, fps=10))
    # ticks 0,.1,...: the latest frame at or before each; the last frame lasts ~1/rate
    expect = [0, 1, 2, 2, 2, 4, 4, 5]  # frame 3 (0.42 s) is superseded by 4 (0.43 s) before 0.5 s
    assert len(out) == len(expect)
    for got, k in zip(out, expect):
        np.testing.assert_array_equal(got, frames[k])
    with media.open_media(path) as f:
        times = [t for _, t in f.timed_frames(start=1)]
    assert times == [Fraction(t - 100, 1000) for t in times_ms[1:]]  # from the first frame read
    assert not media.is_constant_rate(times, Fraction(10), Fraction(1, 1000))
    with media.open_media(path) as f:
        times = [t for _, t in f.timed_frames(fps=10, end=4)]
    assert times == [Fraction(k, 10) for k in range(4)] and media.is_constant_rate(times, Fraction(10), Fraction(0))


def test_timed_reorders_packet_stamped_times():
    # AVI + B-frames: frames come in display order stamped 1, 2, 3, 5, 4, 6, ...
    stamped = [1, 2, 3, 5, 4, 6, 8, 7, 9]
    frames = [SimpleNamespace(pts=p, id=i) for i, p in enumerate(stamped)]
    stream = SimpleNamespace(time_base=Fraction(1, 10), average_rate=Fraction(10), guessed_rate=None,
                             base_rate=None)
    out = list(media._timed(iter(frames), stream))
    assert [f.id for f, _ in out] == list(range(9))
    assert [t for _, t in out] == [Fraction(p, 10) for p in sorted(stamped)]


def test_size_and_fit_size(clips):
    out = list(read_frames(clips.b_mp4, size=(47, 35), end=2))
    assert [o.shape for o in out] == [(35, 47, 3)] * 2
    assert mad(out[0], np.asarray(Image.fromarray(clips.b[0]).resize((47, 35), Image.LANCZOS))) < 4
    assert fit_size(1920, 1080, 1280) == (1280, 720)
    assert fit_size(1080, 1920, 640) == (360, 640)
    assert fit_size(640, 480, 1280) == (640, 480)  # never upscales
    assert fit_size(1000, 3, 100) == (100, 1)
    assert all(isinstance(v, int) for v in fit_size(95, 71, 50))


# ------------------------------------------------------------------ writer

@pytest.mark.parametrize("w,h,fps", [(64, 48, Fraction(24)), (95, 71, Fraction(30000, 1001))])
def test_video_writer_round_trip(tmp_path, w, h, fps):
    path = tmp_path / "out.mp4"
    frames = [pattern(i, w, h) for i in range(10)]
    with VideoWriter(path, fps, w, h, crf=12, preset="ultrafast") as vw:
        for f in frames:
            vw.write(f)
    assert vw.frames_written == 10
    info = probe(path)
    assert (info.width, info.height, info.fps, info.frame_count) == (w, h, fps, 10)
    out = list(read_frames(path))
    assert len(out) == 10 and out[0].shape == (h, w, 3)
    assert max(mad(g, f) for g, f in zip(out, frames)) < 3.0
    with av.open(str(path)) as c:  # what other players see: H.264 4:2:0, even size
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert (s.codec_context.width, s.codec_context.height) == (w + w % 2, h + h % 2)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_video_writer_exception_leaves_nothing(tmp_path):
    path = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(path, Fraction(24), 32, 24) as vw:
            vw.write(pattern(0, 32, 24))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CvaeError, match="no frames"):
        with VideoWriter(path, 24, 32, 24):
            pass
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="shape"):
        with VideoWriter(path, 24, 32, 24) as vw:
            vw.write(pattern(0, 24, 32))
    assert list(tmp_path.iterdir()) == []


def test_write_image(tmp_path):
    frame = pattern(3, 33, 21)
    write_image(tmp_path / "a.png", frame)
    np.testing.assert_array_equal(next(read_frames(tmp_path / "a.png")), frame)
    write_image(tmp_path / "a.jpg", frame)
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"
    assert mad(next(read_frames(tmp_path / "a.jpg")), frame) < 4
    with pytest.raises(CvaeError, match="unknown image type"):
        write_image(tmp_path / "a.xyz", frame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "a.png"]


# ------------------------------------------------------------------ images and rotation

def test_image_reads_one_rgb_frame(tmp_path):
    rgb = pattern(1, 40, 30)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    info = probe(tmp_path / "rgb.png")
    assert info == MediaInfo(str(tmp_path / "rgb.png"), 40, 30, None, 1, True, 0, codec="PNG")
    assert is_image(tmp_path / "rgb.png")
    out = list(read_frames(tmp_path / "rgb.png", fps=12))
    assert len(out) == 1
    np.testing.assert_array_equal(out[0], rgb)
    assert list(read_frames(tmp_path / "rgb.png", start=1)) == []
    assert next(read_frames(tmp_path / "rgb.png", size=(20, 15))).shape == (15, 20, 3)

    rgba = np.dstack([rgb, np.full((30, 40), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(next(read_frames(tmp_path / "rgba.png")), rgb)

    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    grey = next(read_frames(tmp_path / "grey.png"))
    assert grey.shape == (30, 40, 3)
    np.testing.assert_array_equal(grey, np.repeat(rgb[..., :1], 3, axis=2))

    deep = (rgb[..., 0].astype(np.uint16) * 257)  # 16-bit grey must scale, not clip to white
    Image.fromarray(deep).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(next(read_frames(tmp_path / "grey16.png"))[..., 0], rgb[..., 0])


def test_jpeg_exif_orientation(tmp_path):
    stored = pattern(0, 48, 32)  # red marker top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "o.jpg", exif=exif, quality=95)
    info = probe(tmp_path / "o.jpg")
    assert (info.width, info.height, info.is_image) == (32, 48, True)
    out = next(read_frames(tmp_path / "o.jpg"))
    assert out.shape == (48, 32, 3)
    assert mad(out, np.rot90(stored, -1)) < 4  # marker now top-right


def test_gif_is_a_video(tmp_path):
    frames = [Image.fromarray(pattern(i * 9, 32, 24)) for i in range(4)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert not is_image(tmp_path / "a.gif")
    info = probe(tmp_path / "a.gif")
    assert not info.is_image and (info.width, info.height) == (32, 24)
    assert len(list(read_frames(tmp_path / "a.gif"))) == 4
    assert len(list(read_frames(tmp_path / "a.gif", fps=20))) == 8  # 0.4 s at 20 fps


def test_rotation_metadata_is_applied(tmp_path):
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix")
    frames = [pattern(i, 64, 48) for i in range(3)]
    path = make_video(tmp_path / "r.mp4", frames, 24, pix_fmt="yuv444p", options={"crf": "0"}, rotation=90)
    info = probe(path)
    assert (info.width, info.height, info.rotation) == (48, 64, 90)
    out = list(read_frames(path, size=(24, 32)))
    assert out[0].shape == (32, 24, 3)
    out = list(read_frames(path))
    assert out[0].shape == (64, 48, 3)
    for got, want in zip(out, frames):
        assert mad(got, np.rot90(want, 1)) < 2  # counter-clockwise: the marker ends bottom-left


# ------------------------------------------------------------------ errors

def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CvaeError, match="^no such file: .*nope.mp4$"):
        probe(tmp_path / "nope.mp4")
    with pytest.raises(CvaeError, match="no such file"):
        read_frames(tmp_path / "nope.mp4")  # at the call, not at the first frame
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 50)
    (tmp_path / "text.png").write_text("nor an image\n")
    for name in ("text.mp4", "text.png"):
        with pytest.raises(CvaeError, match="is not an image or video PyAV/Pillow can read"):
            probe(tmp_path / name)
        with pytest.raises(CvaeError, match="is not an image or video"):
            list(read_frames(tmp_path / name))
    with pytest.raises(ValueError):
        read_frames(tmp_path / "text.mp4", fps=0)
    with pytest.raises(CvaeError, match="is not a file"):
        probe(tmp_path)


def test_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(CvaeError, match="has no video stream"):
        probe(path)
    with pytest.raises(CvaeError, match="has no video stream"):
        list(read_frames(path))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """33 noise frames, index first (faststart) so a cut file still opens."""
    d = tmp_path_factory.mktemp("noisy")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(33)]
    # default preset: B-frames, so the decoder holds frames back that a cut must not lose
    path = make_video(d / "n.mp4", frames, 24, options={"crf": "18"},
                      container_options={"movflags": "+faststart"})
    return path, frames


def test_truncated_mp4_mid_packet(noisy, tmp_path):
    path, frames = noisy
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with av.open(str(path)) as c:
        whole = sum(1 for p in c.demux(c.streams.video[0]) if p.size and p.pos + p.size <= len(data) // 2)
    kept = list(read_frames(cut, allow_partial=True))
    assert 5 <= whole < 33 and len(kept) == whole  # every frame whose data is complete is kept
    with pytest.raises(CvaeError) as e:
        list(read_frames(cut))
    assert str(e.value) == (f"{cut}: video is corrupt or truncated after {len(kept)} frames "
                            "(use --allow-partial to keep them)")
    clean = list(read_frames(path))
    assert len(clean) == 33
    for got, want in zip(kept, clean):
        np.testing.assert_array_equal(got, want)


def test_truncated_mp4_at_packet_boundary(noisy, tmp_path):
    """No decoder error at all: the file simply ends early. The mp4 index still lists 33 samples."""
    path, _ = noisy
    with av.open(str(path)) as c:
        ends = sorted(p.pos for p in c.demux(c.streams.video[0]) if p.size)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: ends[20]])
    assert len(list(read_frames(cut, allow_partial=True))) == 20
    with pytest.raises(CvaeError, match=r"corrupt or truncated after 20 frames \(use --allow-partial"):
        list(read_frames(cut))
    assert probe(cut).frame_count == 33  # the header still claims the full length


def test_mp4_cut_before_its_index(clips, tmp_path):
    cut = tmp_path / "cut.mp4"  # moov at the end: half a file has no index at all
    cut.write_bytes(clips.a_mp4.read_bytes()[: clips.a_mp4.stat().st_size // 2])
    with pytest.raises(CvaeError, match="is not an image or video"):
        probe(cut)


def test_a_process_forked_after_reading_can_collect_garbage():
    """A DataLoader worker forked after a video was read (cvae train's survey, an encode before a
    LatentDataset loader) hung on its first garbage collection: the decoder was left in a reference
    cycle, and freeing its codec context in the child waits for decoder threads it does not have."""
    import gc
    import os
    import signal
    import time

    clip = Path(__file__).resolve().parents[1] / "examples" / "cockatoo.mp4"
    gc.collect()
    gc.disable()  # what a collection in the parent would hide: the cycles left at the fork
    try:
        with media.open_media(clip) as f:
            assert len(list(f.frames())) == 41
        assert probe(clip).frame_count == 41
        child = os.fork()
        if child == 0:
            gc.collect()
            os._exit(0)
    finally:
        gc.enable()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    pytest.fail("the forked process hung collecting the parent's decoder")
