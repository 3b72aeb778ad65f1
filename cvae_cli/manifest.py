"""Manifest rows (.txt, .csv, .jsonl): parsed and checked, every column kept as written.

A manifest lists clips; each row's output mirrors its path relative to the manifest's folder
(`videos/a/b.mp4` -> `videos/a/b.safetensors`). Only parsing lives here, so that training can read
a manifest without importing the dataset runner. Which rows conflict (two writing one output, or
one key) is decided when rows become samples (`samples`), since one video may give many clips.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterator

from .errors import CvaeError

if TYPE_CHECKING:
    from .selection import Selection

SUFFIX = ".safetensors"
FIELDS = ("path", "start", "end", "fps", "size", "output")  # the columns cvae itself reads


@dataclass(frozen=True)
class Clip:
    """One manifest row: a source file, the frames wanted, its output path under out_dir, and every
    column of the row as written (`columns`: strings from a .csv, JSON values from a .jsonl)."""

    path: Path  # the source, resolved against the manifest's folder
    output: PurePosixPath  # relative to out_dir
    start: int | None = None
    end: int | None = None
    fps: float | None = None
    size: tuple[int, int] | None = None  # (width, height)
    line: int = 0  # in the manifest, for messages
    columns: dict = field(default_factory=dict, hash=False)

    def selection(self, base: Selection | None = None) -> Selection:
        """`base` (the command line's options) with this row's own fields on top."""
        if base is None:
            from .selection import Selection
            base = Selection()
        given = {k: getattr(self, k) for k in ("start", "end", "fps", "size") if getattr(self, k) is not None}
        return replace(base, **given)

    def record(self) -> dict:
        """What failures.jsonl says about the row."""
        out = {"path": str(self.path), "output": str(self.output), "line": self.line}
        out.update({k: getattr(self, k) for k in ("start", "end", "fps") if getattr(self, k) is not None})
        if self.size:
            out["size"] = f"{self.size[0]}x{self.size[1]}"
        return out


def read_manifest(path: str | os.PathLike) -> list[Clip]:
    """Rows of a .txt (one path a line; blank lines and `#` comments skipped), a .csv (header
    with a `path` column) or a .jsonl (an object a line with a `path` key). Optional per-row
    fields: `start`, `end` (frame indices, end exclusive), `fps`, `size` (WxH), `output` (a path
    under out_dir); any other column is kept in `Clip.columns`. Exact duplicates are dropped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise CvaeError(f"cannot read manifest {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CvaeError(f"manifest {path} is not UTF-8 text") from None
    kind = path.suffix.lower()
    if kind == ".csv":
        rows = _csv_rows(path, text)
    elif kind in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path, text)
    else:
        rows = ((n, {"path": line.strip()}) for n, line in enumerate(text.splitlines(), 1)
                if line.strip() and not line.lstrip().startswith("#"))
    base = Path(os.path.abspath(path.parent))
    clips, seen = [], set()
    for n, row in rows:
        clip = _clip(row, base, f"{path}:{n}", n)
        same = replace(clip, line=0)
        if (same, _frozen(clip.columns)) in seen:
            continue
        seen.add((same, _frozen(clip.columns)))
        clips.append(clip)
    if not clips:
        raise CvaeError(f"manifest {path} lists no clips")
    return clips


def _frozen(columns: dict) -> str:
    return json.dumps(columns, sort_keys=True, default=str)


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "path" not in [f.strip() for f in reader.fieldnames]:
        raise CvaeError(f"manifest {path}: the CSV header needs a `path` column (got {reader.fieldnames})")
    for row in reader:
        yield reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise CvaeError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise CvaeError(f"{path}:{n}: expected a JSON object with a `path` key")
        yield n, row


def _clip(row: dict, base: Path, where: str, line: int) -> Clip:
    def get(key):
        v = row.get(key)
        return None if v is None or v == "" else v

    src = get("path")
    if not isinstance(src, str):
        raise CvaeError(f"{where}: no `path`")
    src_path = Path(os.path.normpath(base / os.path.expanduser(src)))
    try:
        start = None if get("start") is None else int(get("start"))
        end = None if get("end") is None else int(get("end"))
        fps = None if get("fps") is None else float(get("fps"))
    except (TypeError, ValueError):
        raise CvaeError(f"{where}: start and end must be whole numbers and fps a number") from None
    if (start is not None and start < 0) or (end is not None and end <= (start or 0)) or (fps is not None and fps <= 0):
        raise CvaeError(f"{where}: bad selection start={start} end={end} fps={fps}")
    size = get("size")
    if size is not None:
        try:
            w, h = (size if isinstance(size, (list, tuple)) else str(size).lower().split("x"))
            size = (int(w), int(h))
            if min(size) < 1:
                raise ValueError
        except (TypeError, ValueError):
            raise CvaeError(f"{where}: size {size!r}: expected WxH, e.g. 640x360") from None
    output = get("output")
    if output is not None:
        out = PurePosixPath(str(output).replace(os.sep, "/"))
        if out.is_absolute() or ".." in out.parts or not out.name:
            raise CvaeError(f"{where}: output {output!r} must be a relative path inside --out-dir")
    else:
        out = PurePosixPath(mirror(src_path, base)).with_suffix(SUFFIX)
    return Clip(src_path, out, start, end, fps, size, line, dict(row))


def mirror(src: Path, base: Path) -> str:
    """`src` relative to `base`; a path outside `base` keeps its whole absolute path (anchor dropped)."""
    rel = os.path.relpath(src, base) if os.path.splitdrive(str(src))[0] == os.path.splitdrive(str(base))[0] else ".."
    if rel == ".." or rel.startswith(".." + os.sep):
        rel = str(Path(*src.parts[1:]))
    return rel.replace(os.sep, "/")
