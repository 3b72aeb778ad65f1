"""Rows -> samples: clips cut from real video, buckets, keys; each clip encoded as `--frames s:s+N`."""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cvae_cli import media
from cvae_cli.cli import app
from cvae_cli.errors import CvaeError
from cvae_cli.manifest import Clip, read_manifest
from cvae_cli import Selection
from cvae_cli.samples import Cutting, check_keys, nearest_bucket, parse_buckets, preset, row_samples
from conftest import REPO

runner = CliRunner()
COCKATOO, COFFEE = REPO / "examples" / "cockatoo.mp4", REPO / "examples" / "coffee.jpg"  # 41 frames at 20 fps; 600x400


def row(path: Path = COCKATOO, **fields) -> Clip:
    out = PurePosixPath(fields.pop("output", Path(path).stem + ".safetensors"))
    return Clip(Path(path), out, line=fields.pop("line", 1), columns={"path": Path(path).name}, **fields)


def spans(samples) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in samples]


def test_a_video_becomes_whole_clips_inside_its_range_and_a_photo_one_sample():
    info = media.probe(COCKATOO)
    assert info.frame_count == 41
    samples, left = row_samples(row(), 0, info, Cutting(17))
    assert spans(samples) == [(0, 17), (17, 34)] and left is None  # 7 frames of tail left out
    assert [s.key for s in samples] == ["cockatoo_000000", "cockatoo_000017"]
    assert [str(s.output) for s in samples] == ["cockatoo_000000.safetensors", "cockatoo_000017.safetensors"]
    samples, _ = row_samples(row(), 0, info, Cutting(9, 8))
    assert spans(samples) == [(0, 9), (8, 17), (16, 25), (24, 33), (32, 41)] and [s.clip for s in samples] == [0, 1, 2, 3, 4]
    samples, _ = row_samples(row(start=5, end=30), 3, info, Cutting(9))  # the row's range limits the cut
    assert spans(samples) == [(5, 14), (14, 23)] and {s.index for s in samples} == {3}
    samples, _ = row_samples(row(), 0, info, Cutting(9), Selection(fps=10))  # counted after resampling: 20 frames
    assert spans(samples) == [(0, 9), (9, 18)]
    samples, _ = row_samples(row(COFFEE), 0, media.probe(COFFEE), Cutting(17))
    assert spans(samples) == [(None, None)] and samples[0].key == "coffee"
    samples, left = row_samples(row(), 0, info, Cutting(45))
    assert samples == [] and left.reason == f"{COCKATOO}: 41 frames (after --fps) in [0, 41), fewer than --clip-frames 45"
    samples, left = row_samples(row(start=30), 0, info, Cutting(17))
    assert samples == [] and "11 frames (after --fps) in [30, 41)" in left.reason


def test_without_cutting_a_row_is_one_sample_as_before():
    (sample,), left = row_samples(row(start=2, end=9), 0, None, Cutting())
    assert left is None and sample.start is None and sample.output == PurePosixPath("cockatoo.safetensors")
    assert sample.selection(Selection(max_side=64)) == Selection(start=2, end=9, max_side=64)


@pytest.mark.parametrize("text, message", [
    ("huge", "expected comma-separated WxH"), ("64x", "expected comma-separated WxH"),
    ("64x64,0x32", "expected comma-separated WxH"), ("", "expected comma-separated WxH")])
def test_bad_bucket_lists_are_one_clear_error(text, message):
    with pytest.raises(CvaeError, match=message):
        parse_buckets(text)


@pytest.mark.parametrize("n, stride, message", [(8, None, "1 \\+ 4k"), (0, None, "1 \\+ 4k"),
                                                (None, 4, "needs --clip-frames"), (9, 0, "at least 1")])
def test_bad_clip_options_are_one_clear_error(n, stride, message):
    with pytest.raises(CvaeError, match=message):
        Cutting(n, stride)


def test_presets_are_aspect_ratios_at_about_their_pixel_count_and_the_nearest_wins():
    for name, area in (("256px", 256 * 256), ("512px", 512 * 512), ("720p", 1280 * 720)):
        buckets = parse_buckets(name)
        assert len(buckets) == 9 and all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
        assert all(0.85 < w * h / area < 1.15 for w, h in buckets), buckets
    assert (1280, 720) in preset(1280 * 720) and (512, 512) in parse_buckets("512px")
    assert parse_buckets("64x64, 96x64,64x64") == ((64, 64), (96, 64))
    buckets = parse_buckets("64x64,96x64,64x96")
    assert nearest_bucket(456, 256, buckets) == (96, 64)  # 1.78 is nearer 1.5 than 1
    assert nearest_bucket(300, 400, buckets) == (64, 96) and nearest_bucket(500, 500, buckets) == (64, 64)
    assert nearest_bucket(100, 100, ((64, 32), (32, 64))) == (64, 32)  # a tie goes to the first


def test_a_bucket_covers_and_centre_crops_in_the_one_resize():
    select = Selection(bucket=(64, 64))
    with media.open_media(COFFEE) as f:  # 600x400 -> its middle 400x400 -> 64x64
        assert select.box(f.info) == (100.0, 0.0, 500.0, 400.0)
        frame, = select.frames(f)
    full = Image.open(COFFEE).convert("RGB")
    cropped = np.asarray(full.crop((100, 0, 500, 400)).resize((64, 64), Image.Resampling.LANCZOS), np.int16)
    squashed = np.asarray(full.resize((64, 64), Image.Resampling.LANCZOS), np.int16)
    assert frame.shape == (64, 64, 3)
    assert np.abs(frame - cropped).mean() < 1.5 < np.abs(frame - squashed).mean()
    tall = Selection(bucket=(32, 64))
    with media.open_media(COCKATOO) as f:  # 456x256 -> its middle 128x256
        assert tall.box(f.info) == (164.0, 0.0, 292.0, 256.0)
        frames = list(tall.frames(f))
    assert len(frames) == 41 and frames[0].shape == (64, 32, 3)


def test_keys_are_stable_dot_free_and_two_rows_on_one_key_are_refused(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"path": "clips/a.b.mp4"}\n{"path": "clips/a_b.mp4"}\n')
    one, two = read_manifest(tmp_path / "m.jsonl")
    info = media.probe(COCKATOO)
    first = [s.key for s in row_samples(one, 0, info, Cutting(17))[0]]
    assert first == ["clips_a_b_000000", "clips_a_b_000017"] == [s.key for s in row_samples(one, 0, info, Cutting(17))[0]]
    samples = row_samples(one, 0, None, Cutting())[0] + row_samples(two, 1, None, Cutting())[0]
    check_keys(samples, keys=False)  # per-file: two outputs, no conflict
    with pytest.raises(CvaeError, match=r"manifest lines 1 and 2 make the same key clips_a_b "):
        check_keys(samples)
    same = row_samples(one, 0, None, Cutting())[0] + row_samples(row(Path("x.mp4"), output="clips/a.b.safetensors",
                                                                     line=7), 1, None, Cutting())[0]
    with pytest.raises(CvaeError, match=r"manifest lines 1 and 7 both write clips/a.b.safetensors"):
        check_keys(same, keys=False)


def test_each_clip_is_encoded_exactly_as_encode_frames_would(tmp_path, weights):
    """Per-file clips are named after their start frame and equal `cvae encode --frames s:s+N` bit for bit,
    with and without --fps resampling."""
    for src in (COCKATOO, COFFEE):
        (tmp_path / src.name).symlink_to(src)
    (tmp_path / "m.csv").write_text("path,caption\ncockatoo.mp4,a cockatoo\ncoffee.jpg,coffee\n")
    common = ["-w", weights, "--device", "cpu", "--chunk", "4", "--max-side", "32"]
    for fps, n, stride, start in ((None, 5, 16, 16), ("10", 5, None, 15)):
        rate = ["--fps", fps] if fps else []
        out = tmp_path / f"out{fps}"
        r = runner.invoke(app, [str(a) for a in ["encode", "--manifest", tmp_path / "m.csv", "--out-dir", out,
                                                 "--clip-frames", n, *(["--clip-stride", stride] if stride else []),
                                                 *rate, *common]])
        assert r.exit_code == 0, r.output
        clip = out / f"cockatoo_{start:06d}.safetensors"
        alone = tmp_path / f"alone{fps}.safetensors"
        r = runner.invoke(app, [str(a) for a in ["encode", COCKATOO, "-o", alone, "--frames", f"{start}:{start + n}",
                                                 *rate, *common]])
        assert r.exit_code == 0, r.output
        assert clip.read_bytes() == alone.read_bytes()
        assert (out / "coffee.safetensors").is_file()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["done"] == (4 if fps is None else 5) and summary["too_short"] == 0


def test_one_decode_serves_overlapping_clips_read_together_as_each_alone(monkeypatch):
    from cvae_cli.samples import ClipReaders

    decodes, real = [], media.MediaFile.timed_frames
    monkeypatch.setattr(media.MediaFile, "timed_frames", lambda self, **kw: decodes.append(kw) or real(self, **kw))

    base = Selection(fps=15, max_side=48)  # resampled (41 frames at 20 fps -> 31 at 15) and resized
    samples, _ = row_samples(row(), 0, media.probe(COCKATOO), Cutting(9, 4), base)
    assert spans(samples) == [(s, s + 9) for s in range(0, 22 + 1, 4)]
    with ClipReaders(samples, base) as readers:
        views = [readers.opener(s)() for s in samples[:3]]  # a batch of three, read in turns
        streams = [iter(s.selection(base).frames(v)) for s, v in zip(samples, views)]
        together = [[] for _ in streams]
        for _ in range(9):
            for got, stream in zip(together, streams):
                got.append(next(stream))
        for v in views:
            v.close()
        later = [list(s.selection(base).frames(readers.opener(s)())) for s in samples[3:]]
    assert [(d["start"], d["end"]) for d in decodes] == [(0, 29)]  # up to the last clip's end, once
    for sample, frames in zip(samples, together + later):
        with media.open_media(COCKATOO) as f:
            alone = list(sample.selection(base).frames(f))
        assert len(frames) == len(alone) == 9
        assert all(np.array_equal(a, b) for a, b in zip(frames, alone)), sample.key
