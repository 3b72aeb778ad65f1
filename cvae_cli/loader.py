"""LatentDataset: the latents `cvae encode` wrote, back into PyTorch, each sample once per epoch.

Reads WebDataset tar shards (`KEY.safetensors` + `KEY.json` per sample, as `encode --shards`
writes them) or a folder of latent files (`encode --out-dir`). Needs torch, safetensors, tarfile
and json only: no model, no command line.

Who reads what. An epoch's consumers are every (rank, DataLoader worker) pair, numbered
rank * workers + worker. With at least as many shards as consumers, consumer c reads whole shards:
the c-th, (c + n)-th, ... of the epoch's shard order. With fewer shards, every consumer walks every
shard and keeps the samples whose position in the epoch's order is c mod n, reading only their
bytes. A folder of latent files is split by file, which is by sample. Either way the shares are
disjoint and together hold every sample: exactly once per epoch. They need not be equal in size
(shards differ, samples do not divide evenly), so a distributed loop should not count on every
rank getting the same number of batches.

Order. Shards in name order (files in path order); with `shuffle=N` the shard order is shuffled per
(seed, epoch), the same on every consumer, and each consumer passes its samples through a buffer of
N drawn from at random (by seed, epoch, consumer). The same seed, epoch, world size and worker
count give the same order.

Safety. Hidden files and folders (names starting with `.`: unfinished shards, `encode`'s
temporaries, its `.cvae` bookkeeping) and files with other suffixes (`*.tar.damaged`) are never
read from a folder. A shard is checked whole before its first sample is given out (every member's
data inside the file, the end-of-archive blocks present, each sample with its two members), so a
shard cut short on disk is refused with one line instead of read in half.
"""
from __future__ import annotations

import glob
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .errors import CvaeError
from .latents import LatentFile

SHARD_SUFFIX = ".tar"
LATENT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class _Member:
    offset: int  # of the data in the shard file
    size: int


@dataclass(frozen=True)
class _Entry:
    """One sample of a shard: where its two members' data lie."""

    key: str
    latent: _Member
    meta: _Member


class LatentDataset(torch.utils.data.IterableDataset):
    """Items are dicts: `key` (str), `latent` (C, T', H', W') and `meta` (the sample's KEY.json; for
    a folder of latent files, built from the file's own metadata, see `file_meta`), plus `logvar`
    with `logvar=True` (then every file must hold one).

    `source`: a folder (of shards, else of latent files, searched recursively), one shard or latent
    file, a glob, or a list of shards or of latent files. `scale`: multiply latents (not logvar) by
    the scaling factor stored in each latent (0.18215 for SD-family models), as diffusion training
    wants them. `shuffle`: the shuffle buffer's size (0: file order). `rank`/`world_size`: this
    process's share; by default torch.distributed's when initialised, else $RANK / $WORLD_SIZE
    (as torchrun sets them), else the whole. Call `set_epoch(e)` before each epoch (with persistent
    DataLoader workers, recreate the loader instead: they keep the epoch they started with)."""

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], *, shuffle: int = 0,
                 seed: int = 0, scale: bool = False, dtype: torch.dtype = torch.float32, logvar: bool = False,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle < 0:
            raise CvaeError(f"shuffle={shuffle!r}: give the shuffle buffer's size in samples (0: no shuffle)")
        self.kind, self.paths, self.root = find(source)
        self.shuffle, self.seed, self.scale, self.dtype, self.logvar = shuffle, int(seed), scale, dtype, logvar
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        workers, wid = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        consumers, me = self.world_size * workers, self.rank * workers + wid
        order = list(self.paths)
        if self.shuffle:
            random.Random(f"cvae-loader:{self.seed}:{self.epoch}").shuffle(order)
        if self.kind == "files":
            items = (self._file_item(p) for p in order[me::consumers])
        elif len(order) >= consumers:
            items = (item for p in order[me::consumers] for item in self._shard_items(p, 0, 1))
        else:
            items = self._every_nth(order, me, consumers)
        if self.shuffle:
            rng = random.Random(f"cvae-loader:{self.seed}:{self.epoch}:{me}:{consumers}")
            items = _buffered_shuffle(items, self.shuffle, rng)
        return items

    # --- reading ---------------------------------------------------------------------------------

    def _every_nth(self, shards: list[Path], me: int, consumers: int) -> Iterator[dict]:
        """The samples at positions me, me + n, ... of the shards' samples in order."""
        seen = 0
        for path in shards:
            count = yield from self._shard_items(path, (me - seen) % consumers, consumers)
            seen += count

    def _shard_items(self, path: Path, first: int, step: int):
        """Items first, first + step, ... of one shard (checked whole first); returns its sample count."""
        entries = read_index(path)
        with open(path, "rb") as f:
            for entry in entries[first::step]:
                meta_bytes, latent_bytes = _read(f, entry.meta), _read(f, entry.latent)
                where = f"{path}: {entry.key}"
                try:
                    meta = json.loads(meta_bytes)
                except ValueError as e:
                    raise CvaeError(f"{where}.json is not JSON ({e})") from None
                latent = LatentFile.from_bytes(latent_bytes, f"{where}{LATENT_SUFFIX}")
                yield self._item(entry.key, latent, meta)
        return len(entries)

    def _file_item(self, path: Path) -> dict:
        latent = LatentFile.open(path)
        try:
            rel = path.relative_to(self.root) if self.root is not None else Path(path.name)
            key = rel.with_suffix("").as_posix()
            return self._item(key, latent, file_meta(latent, rel.as_posix()))
        finally:
            latent.close()

    def _item(self, key: str, latent: LatentFile, meta: dict) -> dict:
        tensor = latent.read(self.dtype)
        if self.scale:
            tensor = tensor * latent.meta.scaling_factor
        item = {"key": key, "latent": tensor, "meta": meta}
        if self.logvar:
            if not latent.has_logvar:
                raise CvaeError(f"{latent.path} holds no logvar (encode with --save-logvar, or leave logvar off)")
            item["logvar"] = latent.read(self.dtype, "logvar")
        return item


def file_meta(latent: LatentFile, file: str) -> dict:
    """A latent file's `meta`, in the names KEY.json uses: where it came from and its sizes."""
    m = latent.meta
    return {"path": m.source, "file": file, "frames": m.frames, "width": m.width, "height": m.height,
            "fps": None if m.fps is None else float(m.fps), "latent_shape": list(latent.shape)}


def find(source) -> tuple[str, tuple[Path, ...], Path | None]:
    """("shards" or "files", the paths in order, the folder keys are relative to)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            visible = [p for p in sorted(path.rglob("*")) if p.is_file() and not _hidden(p.relative_to(path))]
            shards = [p for p in visible if p.name.endswith(SHARD_SUFFIX)]
            files = [p for p in visible if p.name.endswith(LATENT_SUFFIX)]
            if shards and files:
                raise CvaeError(f"{path} holds both shards (*.tar) and latent files (*.safetensors): "
                                "name the shards or the files")
            if not shards and not files:
                raise CvaeError(f"{path} holds no shards (*.tar) and no latent files (*.safetensors)")
            return ("shards", tuple(shards), path) if shards else ("files", tuple(files), path)
        if not path.exists() and glob.has_magic(str(source)):
            matches = sorted(glob.glob(str(source)))
            if not matches:
                raise CvaeError(f"no file matches {source}")
            return find(matches)
        source = [source]
    paths = [Path(p) for p in source]
    if not paths:
        raise CvaeError("no shards or latent files given")
    for p in paths:
        if not p.is_file():
            raise CvaeError(f"no such file: {p}" if not p.exists() else f"{p} is not a file")
    kinds = {"shards" if p.name.endswith(SHARD_SUFFIX) else "files" if p.name.endswith(LATENT_SUFFIX) else None
             for p in paths}
    if None in kinds or len(kinds) > 1:
        raise CvaeError("give shards (*.tar) or latent files (*.safetensors), not "
                        + ", ".join(sorted({p.suffix or p.name for p in paths})))
    return kinds.pop(), tuple(paths), None


def read_index(path: Path) -> list[_Entry]:
    """The samples of a shard, in order; CvaeError unless the shard is whole (see the module)."""
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            end = tar.offset  # where the end-of-archive blocks must be
            tar.fileobj.seek(end)
            marker = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    except tarfile.ReadError as e:
        if "unexpected end of data" in str(e):  # a member's data ends with the file
            raise CvaeError(f"{path} is cut short: {e}") from None
        raise CvaeError(f"{path} is not a readable shard ({e})") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CvaeError(f"{path} is not a readable shard ({e})") from None
    for m in members:
        if m.isfile() and m.offset_data + m.size > size:
            raise CvaeError(f"{path} is cut short: {m.name} runs past the end of the file")
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise CvaeError(f"{path} is cut short: its end-of-archive marker is missing")
    parts: dict[str, dict[str, _Member]] = {}
    for m in members:
        if not m.isfile():
            continue
        folder, _, name = m.name.rpartition("/")
        stem, dot, ext = name.partition(".")  # WebDataset's rule: the key ends at the first dot
        key = f"{folder}/{stem}" if folder else stem
        parts.setdefault(key, {})[ext] = _Member(m.offset_data, m.size)
    entries = []
    for key, found in parts.items():
        missing = [ext for ext in ("safetensors", "json") if ext not in found]
        if missing:
            raise CvaeError(f"{path}: sample {key} has no {' and no '.join(f'{key}.{e}' for e in missing)}")
        entries.append(_Entry(key, found["safetensors"], found["json"]))
    return entries


# --- internals ------------------------------------------------------------------------------------

def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _read(f, member: _Member) -> bytes:
    f.seek(member.offset)
    data = f.read(member.size)
    if len(data) != member.size:  # shrunk since it was checked
        raise CvaeError(f"{f.name} is cut short")
    return data


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            try:
                rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            except ValueError:
                raise CvaeError(f"RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                                "expected whole numbers") from None
    rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if not 0 <= rank < world_size:
        raise CvaeError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world size")
    return rank, world_size


def _buffered_shuffle(items: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Items in a random order: each incoming item takes the place of one drawn from a buffer of
    `size` (memory: `size` items), the rest in random order at the end."""
    buffer: list[dict] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer
