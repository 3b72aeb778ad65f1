"""WebDataset tar shards: atomic shards, the per-rank journal, the dataset index, the settings record.

Layout under `--out-dir`:
- `shard-RRRRR-NNNNNN.tar`: rank R's N-th shard (names sort by rank, then order of writing). Each
  sample is two members sharing a key: `KEY.safetensors` (exactly the file `cvae encode` writes
  for that clip alone) and `KEY.json` (the row's columns and the clip's facts, `samples.Sample.meta`).
  Written with the standard library's `tarfile` (plain ustar/pax, what WebDataset reads).
- `shards.json`: the weights and settings the shards were made with; a run with others is
  refused before any work unless `--overwrite` (which removes the old shards first).
- `index.jsonl`: one line per sample of the whole dataset (key, shard, row, line, clip, start,
  end, frames, latent shape), written by rank 0 at the end of a run.
- `.cvae/journal.rank-R.jsonl`: what each finished shard holds, one line per shard.

Why a run killed at any moment ends, re-run, with every sample exactly once: a shard is written
to a hidden temporary file and renamed to its final name only once complete (and synced), so a
final name always holds a whole shard, and the final names on disk are the truth of what is done.
A re-run lists them; each one's samples come from the journal when its line matches the file's
size, else from reading the shard itself (a kill between the rename and the journal line). A
shard that does not read as whole (cut short on disk) is renamed aside (`.damaged`) and its
samples are redone; so are the samples of unfinished shards, whose temporary files are removed.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .atomic import FILE_MODE, temp_beside
from .errors import CvaeError

SETTINGS = "shards.json"
INDEX = "index.jsonl"
RUN_DIR = ".cvae"
FORMAT = "cvae-shards/1"
_NAME = re.compile(r"shard-(\d{5})-(\d{6})\.tar")
_TEMP_GLOB = ".shard-*.part.tar"


def shard_name(rank: int, seq: int) -> str:
    return f"shard-{rank:05d}-{seq:06d}.tar"


def shard_files(out_dir: Path) -> list[Path]:
    """The finished shards under `out_dir`, in name order."""
    return sorted(p for p in Path(out_dir).glob("shard-*.tar") if _NAME.fullmatch(p.name))


def journal_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / RUN_DIR / f"journal.rank-{rank}.jsonl"


# --- reading a finished shard -----------------------------------------------------------------

def read_shard(path: Path) -> list[tuple[str, dict]]:
    """(key, KEY.json) of each sample of a shard, in order. CvaeError unless the file is a whole
    shard: every member's data inside the file, the tar's end-of-archive blocks present and the
    file exactly as long as `tarfile` pads it (whole 10 KiB records), and each key with exactly its
    two members. A file cut short on disk, at any byte, fails one of these."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tar:
            members = []
            for m in tar:
                if not m.isfile() or m.offset_data + m.size > size:
                    raise CvaeError(f"{path}: member {m.name} runs past the end of the file")
                members.append(m)
            end = tar.offset  # where the end-of-archive blocks start
            tar.fileobj.seek(end)
            records = -(-(end + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE)
            if size != records * tarfile.RECORDSIZE or tar.fileobj.read(2 * tarfile.BLOCKSIZE).strip(b"\0"):
                raise CvaeError(f"{path}: no end-of-archive marker, or not the whole last record (cut short)")
            pairs: dict[str, dict] = {}
            for m in members:
                key, dot, ext = m.name.partition(".")
                pairs.setdefault(key, {})[ext] = m
            samples = []
            for key, parts in pairs.items():
                if sorted(parts) != ["json", "safetensors"] or "/" in key:
                    raise CvaeError(f"{path}: sample {key} has members {sorted(parts)}, not json and safetensors")
                samples.append((key, json.loads(tar.extractfile(parts["json"]).read())))
            return samples
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise CvaeError(f"{path}: not a whole shard ({e})") from None


@dataclass
class Listing:
    """What the finished shards hold: key -> shard name, and the shards found damaged."""

    keys: dict[str, str] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)

    def merge(self, other: Listing) -> None:
        self.keys.update(other.keys)
        self.damaged += other.damaged


@dataclass(frozen=True)
class _Line:
    """Where a shard's journal line is: the journal, the line's offset, and the shard's size then."""

    journal: Path
    offset: int
    bytes: int


def _journal(out_dir: Path) -> dict[str, _Line]:
    """shard name -> where its journal line is, from every rank's journal (any world size). Only
    the places are kept: the lines, a shard's samples each, are read again one at a time."""
    lines: dict[str, _Line] = {}
    for path in sorted((Path(out_dir) / RUN_DIR).glob("journal.rank-*.jsonl")):
        with contextlib.suppress(OSError), open(path, "rb") as f:
            offset = 0
            for line in f:
                try:
                    entry = json.loads(line)
                    lines[entry["shard"]] = _Line(path, offset, int(entry["bytes"]))
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by a kill
                offset += len(line)
    return lines


def _samples(path: Path, journal: dict[str, _Line]) -> list[tuple[str, dict]]:
    """A finished shard's (key, KEY.json) in order: from its journal line when that line describes
    this very file (same size), else from the shard itself; CvaeError when it is not whole."""
    line = journal.get(path.name)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CvaeError(f"{path}: {e.strerror or e}") from None
    if line is not None and line.bytes == size:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(line.journal, "rb") as f:
            f.seek(line.offset)
            return [(s["key"], s["meta"]) for s in json.loads(f.readline())["samples"]]
    return read_shard(path)


def list_shards(out_dir: Path, rank: int = 0, world: int = 1, rename: bool = True) -> Listing:
    """This rank's strided share of the finished shards: the keys in each; damaged shards are
    renamed to `NAME.damaged` (with `rename`; a dry run only leaves them out)."""
    journal = _journal(out_dir)
    listing = Listing()
    for path in shard_files(out_dir)[rank::world]:
        try:
            samples = _samples(path, journal)
        except CvaeError:
            if rename:
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_name(path.name + ".damaged"))
            listing.damaged.append(path.name)
            continue
        listing.keys.update((key, path.name) for key, _ in samples)
    return listing


def iter_samples(out_dir: Path) -> Iterator[tuple[str, int, str, dict]]:
    """(shard name, position, key, KEY.json) of every sample in the finished shards, shard by shard
    in name order, holding one shard's at a time (a shard that does not read as whole is left out)."""
    journal = _journal(out_dir)
    for path in shard_files(out_dir):
        try:
            samples = _samples(path, journal)
        except CvaeError:
            continue
        for position, (key, meta) in enumerate(samples):
            yield path.name, position, key, meta


# --- settings ---------------------------------------------------------------------------------

def check_settings(out_dir: Path, settings: dict, overwrite: bool) -> bool:
    """Whether the shards under `out_dir` (if any) were made with `settings`; CvaeError when they
    were not (or no record says) and not `overwrite`. Returns True when old shards must go."""
    out_dir = Path(out_dir)
    record = out_dir / SETTINGS
    present = bool(shard_files(out_dir)) or record.exists()
    if not present:
        return False
    try:
        made = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        made = None
    if made == settings:
        return overwrite
    if overwrite:
        return True
    if not isinstance(made, dict):
        raise CvaeError(f"{out_dir} holds shards without a readable {SETTINGS}: use --overwrite or another --out-dir")
    differ = sorted(k for k in set(made) | set(settings) if made.get(k) != settings.get(k))
    raise CvaeError(f"{out_dir} holds shards made with other {', '.join(differ)} "
                    f"({'; '.join(f'{k}: {made.get(k)} there, {settings.get(k)} now' for k in differ[:2])}): "
                    "use --overwrite or another --out-dir")


def clear(out_dir: Path) -> None:
    """Remove the shards, journals, index and settings record of an earlier run (`--overwrite`)."""
    out_dir = Path(out_dir)
    for p in [*shard_files(out_dir), *out_dir.glob("shard-*.tar.damaged"), *out_dir.glob(_TEMP_GLOB),
              *(out_dir / RUN_DIR).glob("journal.rank-*.jsonl"), out_dir / INDEX, out_dir / SETTINGS]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_temporaries(out_dir: Path) -> None:
    """Remove the unfinished shards a killed run left (call before any rank writes)."""
    for p in Path(out_dir).glob(_TEMP_GLOB):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def write_settings(out_dir: Path, settings: dict) -> None:
    from .atomic import atomic_path

    with atomic_path(Path(out_dir) / SETTINGS) as tmp:
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def write_index(out_dir: Path, rows: Iterable[dict]) -> None:
    """index.jsonl from `rows`, as they come (rank 0, at the end of a run)."""
    from .atomic import atomic_path

    with atomic_path(Path(out_dir) / INDEX) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


# --- writing ------------------------------------------------------------------------------------

def _info(name: str, size: int) -> tarfile.TarInfo:
    """A member header that depends on nothing but the name and size (shards are reproducible)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


class ShardWriter:
    """This rank's shards: samples go into a hidden temporary tar, which is synced and renamed to
    its final name once it holds `size` samples, or at `close`. A shard that fails midway is
    removed; one stopped between samples (Ctrl-C, another rank's failure) is finished, since
    every sample in it is whole. Each finished shard gets one line in this rank's journal."""

    def __init__(self, out_dir: Path, rank: int, size: int):
        if size < 1:
            raise CvaeError(f"--shard-size {size}: must be at least 1")
        self.out_dir, self.rank, self.size = Path(out_dir), rank, size
        taken = [int(m.group(2)) for p in self.out_dir.glob(f"shard-{rank:05d}-*.tar*")
                 if (m := _NAME.match(p.name))]
        self.seq = max(taken, default=-1) + 1
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp: Path | None = None
        self._samples: list[dict] = []
        self._clean = True

    @property
    def target(self) -> Path:
        return self.out_dir / shard_name(self.rank, self.seq)

    def add(self, key: str, latent: Path, meta: dict) -> None:
        """Put one sample in the current shard: `latent` (a finished latent file) as KEY.safetensors,
        `meta` as KEY.json."""
        if "." in key or "/" in key:
            raise ValueError(f"bad key {key!r}")
        if self._tar is None:
            self._tmp, self._file = temp_beside(self.target, "part.tar")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._clean = False
        with open(latent, "rb") as f:
            self._tar.addfile(_info(f"{key}.safetensors", os.fstat(f.fileno()).st_size), f)
        data = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        self._tar.addfile(_info(f"{key}.json", len(data)), io.BytesIO(data))
        self._clean = True
        self._samples.append({"key": key, "meta": meta})
        if len(self._samples) >= self.size:
            self.finish()

    def finish(self) -> None:
        """Close the current shard (if any sample is in it) and give it its final name."""
        if self._tar is None:
            return
        tar, f, tmp, target, samples = self._tar, self._file, self._tmp, self.target, self._samples
        self._tar = self._file = self._tmp = None
        self._samples = []
        try:
            tar.close()
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, target)
        except OSError as e:
            with contextlib.suppress(OSError):
                f.close()
                tmp.unlink()
            raise CvaeError(f"cannot write {target}: {e.strerror or e}") from None
        self.seq += 1
        self._journal(target, samples)

    def _journal(self, target: Path, samples: list[dict]) -> None:
        line = json.dumps({"shard": target.name, "bytes": target.stat().st_size,
                           "samples": samples}) + "\n"
        path = journal_path(self.out_dir, self.rank)
        with contextlib.suppress(OSError):  # only a shortcut: a re-run reads the shard instead
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)

    def abort(self) -> None:
        if self._tar is None:
            return
        with contextlib.suppress(OSError):
            self._file.close()
            self._tmp.unlink()
        self._tar = self._file = self._tmp = None
        self._samples = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or self._clean:
            self.finish()
        else:
            self.abort()
