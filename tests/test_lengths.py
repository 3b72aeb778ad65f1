"""Lengths that containers do not state (MPEG-2 program streams, y4m, raw MPEG-2) or state wrongly
(opencv's tree.avi), found by `media` and used by training, planning and the progress total. The
inputs are the repo's real clip re-encoded with PyAV, and Debian's opencv-doc clips where apt can
fetch them."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import av
import pytest
from typer.testing import CliRunner

from cvae_cli import dataset, media, trainset
from cvae_cli.cli import app
from cvae_cli.media import MediaInfo
from cvae_cli import Selection, StreamOptions, encode_many  # wherever the engine keeps them

from conftest import random_model

REPO = Path(__file__).resolve().parents[1]
COCKATOO = REPO / "examples" / "cockatoo.mp4"
OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"


def reencode(dst: Path, fmt: str, codec: str, rate: int) -> Path:
    """The cockatoo clip's frames in another container and codec (every frame kept, in order)."""
    with av.open(str(COCKATOO)) as src, av.open(str(dst), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 456, 256, "yuv420p"
        for frame in src.decode(video=0):
            frame = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return dst


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("lengths")
    with av.open(str(COCKATOO)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    return SimpleNamespace(
        frames=frames,
        mpg=reencode(d / "cockatoo.mpg", "mpeg", "mpeg2video", 25),  # MPEG-2 program stream
        y4m=reencode(d / "cockatoo.y4m", "yuv4mpegpipe", "rawvideo", 20),
        m2v=reencode(d / "cockatoo.m2v", "mpeg2video", "mpeg2video", 25),  # a raw MPEG-2 video stream
    )


@pytest.fixture(scope="session")
def opencv_data() -> Path:
    """Debian opencv-doc's sample clips: installed, cached, or fetched with `apt-get download`."""
    installed = Path("/") / OPENCV_DATA
    if (installed / "tree.avi").is_file():
        return installed
    cache = Path(os.environ.get("CVAE_TEST_CACHE", Path(tempfile.gettempdir()) / "cvae-test-media")) / "opencv-doc"
    data = cache / OPENCV_DATA
    if not (data / "tree.avi").is_file():
        if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
            pytest.skip("opencv-doc's clips need apt-get and dpkg-deb (a Debian system)")
        cache.mkdir(parents=True, exist_ok=True)
        debs = Path(tempfile.mkdtemp(dir=cache))  # on the cache's file system: the unpacked folder is moved
        try:
            got = subprocess.run(["apt-get", "download", "opencv-doc"], cwd=debs, capture_output=True, timeout=300)
            deb = next(debs.glob("opencv-doc_*.deb"), None)
            if got.returncode or deb is None:
                pytest.skip(f"apt-get download opencv-doc failed: {got.stderr.decode(errors='replace').strip()[-200:]}")
            unpack = debs / "x"
            unpack.mkdir()
            tar = subprocess.run(f"dpkg-deb --fsys-tarfile {deb} | tar -x -C {unpack} ./{OPENCV_DATA}/tree.avi "
                                 f"./{OPENCV_DATA}/vtest.avi", shell=True, capture_output=True, timeout=300)
            if tar.returncode:
                pytest.skip(f"cannot unpack {deb.name}: {tar.stderr.decode(errors='replace').strip()[-200:]}")
            shutil.rmtree(cache / "usr", ignore_errors=True)
            os.replace(unpack / "usr", cache / "usr")
        finally:
            shutil.rmtree(debs, ignore_errors=True)
    return data


def decoded(path) -> int:
    return sum(1 for _ in media.read_frames(path))


# ---------------------------------------------------------------- media: the length itself

@pytest.mark.parametrize("kind", ["mpg", "y4m", "m2v"])
def test_length_a_container_does_not_state_is_counted(clips, kind):
    path = getattr(clips, kind)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # the container says nothing
    info = media.probe(path)
    assert not info.is_image  # a raw .m2v is a video, though Pillow reads its header
    assert (info.frame_count, info.frames_from, info.claimed_frames) == (clips.frames, "packets", None)
    assert decoded(path) == clips.frames == 41


def test_a_claim_the_index_confirms_is_trusted(clips):
    info = media.probe(COCKATOO)
    assert (info.frame_count, info.frames_from, info.claimed_frames) == (41, "container", 41)


def test_a_claim_the_index_contradicts_is_not_trusted(opencv_data):
    """tree.avi's header claims 444 frames; its index lists 68, and 68 decode."""
    info = media.probe(opencv_data / "tree.avi")
    assert (info.frame_count, info.frames_from, info.claimed_frames) == (68, "packets", 444)
    assert decoded(opencv_data / "tree.avi") == 68
    assert "  frames: 68 (counted: the container claims 444)" in info_lines(opencv_data / "tree.avi")


def test_a_sound_avi_is_taken_at_its_word(opencv_data):
    info = media.probe(opencv_data / "vtest.avi")
    assert (info.frame_count, info.frames_from, info.fps) == (795, "container", 10)


def test_no_packet_left_estimates_from_duration(clips, monkeypatch):
    """Only where demuxing yields nothing is duration x rate used, and said to be an estimate."""
    monkeypatch.setattr(media, "_count_packets", lambda path, index: 0)
    info = media.probe(clips.mpg)  # 41 frames at 25 fps: the stream lasts 1.64 s
    assert (info.frame_count, info.frames_from) == (41, "duration")


# ---------------------------------------------------------------- where the length is used

def test_training_takes_a_clip_without_a_stated_length(clips, tmp_path):
    """`cvae train` said "no video holds 5 frames" for the .mpg: the survey took the missing
    length as 0. The folder scan also missed .y4m files."""
    folder = tmp_path / "data"
    folder.mkdir()
    for path in (clips.mpg, clips.y4m):
        os.symlink(path, folder / path.name)
    survey = trainset.survey([folder], 64)
    assert sorted((s.path.name, s.frames) for s in survey.sources) == [("cockatoo.mpg", 41), ("cockatoo.y4m", 41)]
    data = trainset.TrainingClips(trainset.Survey(survey.videos[:1], []), trainset.SampleSpec(frames=5, size=64),
                                  seed=0, global_batch=1)
    pixels, failures = data[0]
    assert tuple(pixels.shape) == (3, 5, 64, 64) and failures == []


def test_planning_estimates_a_clip_without_a_stated_length(clips, tmp_path):
    manifest = tmp_path / "clips.csv"
    manifest.write_text(f"path,output\n{clips.mpg},a.safetensors\n{clips.y4m},b.safetensors\n")
    assert [dataset.estimate_frames(c) for c in dataset.read_manifest(manifest)] == [41, 41]


def test_clips_are_cut_from_a_video_without_a_stated_length(clips, tmp_path):
    """`encode --clip-frames 17` said "its length is unknown, so no clip of 17 frames can be cut"."""
    from cvae_cli import samples

    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(f'{{"path": "{clips.mpg}", "caption": "a cockatoo"}}\n')
    (row,) = dataset.read_manifest(manifest)
    cut, left = samples.row_samples(row, 0, media.probe(clips.mpg), samples.Cutting(clip_frames=17))
    assert left is None and [(s.start, s.end) for s in cut] == [(0, 17), (17, 34)]


def test_selection_counts_with_and_without_a_length(clips):
    info = media.probe(clips.mpg)
    assert Selection().expected_frames(info) == 41
    assert Selection(start=10).expected_frames(info) == 31
    assert Selection(fps=50).expected_frames(info) == 82  # 25 fps resampled to 50
    unknown = MediaInfo("x.mpg", 456, 256, None, None, False)
    assert Selection(end=33).expected_frames(unknown) == 33  # --frames 0:33: known without a length
    assert Selection(start=5, end=33).expected_frames(unknown) == 28
    assert Selection().expected_frames(unknown) is None


def test_progress_total_of_a_clip_without_a_stated_length(clips, tmp_path):
    """The bar's total (and so its ETA) is the frames that then go through the model."""
    import contextlib

    totals, ticks = [], []

    @contextlib.contextmanager
    def progress(name, total):
        totals.append(total)
        yield ticks.append

    model = random_model()
    jobs = [(clips.mpg, tmp_path / "a.safetensors", Selection(size=(32, 16)))]
    outcomes = list(encode_many(model, jobs, StreamOptions(chunk=8), progress=progress))
    assert not isinstance(outcomes[0][1], Exception)
    assert totals == [41] and sum(ticks) == 41


def cvae(*args) -> list[str]:
    """`cvae ARGS` in this process: its output lines (it must succeed)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def info_lines(path) -> list[str]:
    return cvae("info", path)


def test_info_states_the_counted_length(clips):
    assert "  frames: 41 (counted: the container does not state it)" in info_lines(clips.mpg)


def test_dry_run_plans_the_clips_of_a_video_without_a_stated_length(clips, tmp_path):
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(f'{{"path": "{clips.mpg}", "caption": "a cockatoo"}}\n')
    lines = cvae("encode", "--manifest", manifest, "--out-dir", tmp_path / "latents", "--shards", "--clip-frames", "17",
                 "--dry-run")
    planned = [line for line in lines if line.startswith("encode ")]
    assert [line.split("(")[-1] for line in planned] == ["start 0, end 17)", "start 17, end 34)"]
