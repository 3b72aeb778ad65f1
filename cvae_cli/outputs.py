"""Which file each input becomes, decided before any work starts, and the rules that keep a user's
files safe: no command writes over one of its own inputs (with or without --overwrite), two inputs
never share an output, and an output's suffix always says what the file holds.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import CvaeError


OWN_OUTPUTS = (".recon", ".decoded")  # what decode and reconstruct add to an output's name


def expand(patterns: Iterable[str]) -> list[Path]:
    """Paths from command-line inputs: a glob that names no existing file is expanded (sorted); one
    that matches nothing is an error. Plain paths pass through (a missing one is the job's error).
    A glob leaves out cvae's own outputs (`X.recon.png`, `X.decoded.mp4`), so that running a command
    again does not take the first run's outputs as new inputs; named by hand, they are inputs."""
    paths: list[Path] = []
    for item in patterns:
        if glob.has_magic(item) and not Path(item).exists():
            found = sorted(glob.glob(item))
            matches = [m for m in found if not is_own_output(Path(m))]
            if not matches:
                raise CvaeError(f"no file matches {item}" + (" but cvae's own outputs" if found else ""))
        else:
            matches = [item]
        paths += [Path(m) for m in matches]
    return paths


def is_own_output(path: Path) -> bool:
    """Whether a file's name is one decode or reconstruct gives its outputs (`X.recon.png`)."""
    return Path(path.stem).suffix.lower() in OWN_OUTPUTS


MIN_FREE_BYTES = 1 << 20  # a folder with less room than this is full for any output of ours


def check_writable(path: Path) -> None:
    """CvaeError unless a file can be created at `path` now: its folder (or the nearest one that
    exists, where the folders will be made) is a writable folder with room left. Checked before the
    work starts, so minutes of compute are not thrown away on a read-only or full disk."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CvaeError(f"cannot write {path}: {folder} is not a folder")
    try:  # a real file, as the output's temporary one will be: root, read-only mounts, ACLs all answer
        fd, probe = tempfile.mkstemp(prefix=".cvae-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CvaeError(f"cannot write {path}: {folder} is not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise CvaeError(f"cannot write {path}: the disk holding {folder} is full ({free} bytes free)")


def name_outputs(inputs: list[Path], output: Path | None, out_dir: Path | None,
                 default_name: Callable[[Path], str], unreadable: Iterable[Path] = ()) -> list[tuple[Path, Path]]:
    """(input, output) pairs: `output` for one input, else `default_name(input)` in `out_dir` (or
    beside the input). Refuses what would lose or destroy data, before anything is read. A file
    given twice (`a.jpg ./a.jpg`, or by a glob and by name) is one job, under its first spelling.
    `unreadable`: inputs the command was given but found it cannot read (they get no output, and
    are still never written over)."""
    unreadable = list(unreadable)
    first: dict[str, Path] = {}
    for src in inputs:  # a file named twice: once, in its first place
        first.setdefault(_identity(src), src)
    inputs = list(first.values())
    if output is not None and len(inputs) + len(unreadable) > 1:
        raise CvaeError("-o/--output takes one input; use --out-dir for several")
    pairs = [(src, output if output is not None else (out_dir or src.parent) / default_name(src)) for src in inputs]
    refuse_unsafe(pairs, unreadable)
    return pairs


def refuse_unsafe(pairs: list[tuple[Path, Path]], other_inputs: Iterable[Path] = ()) -> None:
    """CvaeError when an output is one of the inputs (those of `pairs`, and `other_inputs`: given
    to the command but producing nothing), or two inputs would write one output (one of the two
    would be silently lost)."""
    inputs = {_identity(src): src for src in [*(src for src, _ in pairs), *other_inputs]}
    writers: dict[str, Path] = {}
    for src, dst in pairs:
        key = _identity(dst)
        if key in inputs:
            raise CvaeError(f"{dst} is an input of this command: refusing to write over it")
        if key in writers and _identity(writers[key]) != _identity(src):
            raise CvaeError(f"{writers[key]} and {src} would both write {dst}: give them separate --out-dir "
                            "folders, or a --manifest (its outputs mirror the input folders)")
        writers[key] = src


def _identity(path: Path) -> str:
    """One spelling per file: symlinks and `..` resolved (and a case-insensitive disk's case)."""
    return os.path.normcase(os.path.realpath(path))


def check_suffix(path: Path, allowed: Iterable[str], what: str) -> None:
    """CvaeError unless `path` ends in one of `allowed` (a file named .mp4 must hold a video)."""
    allowed = tuple(allowed)
    if path.suffix.lower() not in allowed:
        raise CvaeError(f"{path}: {what} are written as {', '.join(allowed)}, not {path.suffix or 'no suffix'}")
