"""Whole datasets: planning who encodes what, resumable runs, the summary.

Rows of a manifest (`manifest`) become samples (`samples`: a row, or clips cut from it, each in its
size bucket). Each sample becomes a latent file that mirrors its row's path under `out_dir`
(`videos/a/b.mp4` -> `OUT/videos/a/b.safetensors`, a clip `OUT/videos/a/b_000016.safetensors`),
or, with shards, a sample in a WebDataset tar shard (`shards`). A run is resumable because
outputs appear atomically: a per-file output that opens as a latent file is complete and is
skipped, and so is a sample in a finished shard; anything else is (re)done. Stale temporary files
of a killed run are removed before anything is written. Run one job per output folder at a time.

Many processes (`distributed.Dist`, under torchrun): every rank reads the whole manifest, surveys
a strided share of its rows (their samples, which need a look into the file for clips and
buckets; is each output complete? how many frames?), and the surveys are exchanged, so every rank
computes the same plan: `split` assigns pending samples greedily, longest first, to the
least-loaded rank (LPT), ties broken by manifest order and rank number, so the split is
deterministic and balanced by frame count. Frame counts come from the container
(`samples.video_length`); a file whose length nothing tells is estimated from its size at the
mean bytes-per-frame of the others.

A sample that fails on its own (`convert.per_input`: unreadable, truncated, out of memory) is
appended, as it happens, to `OUT/.cvae/failures.rank-R.jsonl` (so an interrupted run leaves a
record) and the run goes on; any other failure ends the run (and, through `Dist.session`, every
rank). Rows or clips too short for `--clip-frames` are left out and listed in `OUT/skipped.jsonl`.
At the end rank 0 gathers all failures into `OUT/failures.jsonl`, the totals into
`OUT/summary.json` and, with shards, every sample's place into `OUT/index.jsonl` (all written
atomically), and removes the per-rank logs.
"""
from __future__ import annotations

import contextlib
import datetime
import heapq
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from . import media
from .atomic import atomic_path, remove_stale
from .distributed import Dist, rank_prefix
from .errors import CvaeError, describe
from .latents import LatentFile
from .manifest import SUFFIX, Clip, mirror, read_manifest  # noqa: F401 (public names of this module)
from .outputs import refuse_unsafe
from .samples import ClipReaders, Cutting, Left, Sample, check_keys, row_samples
from .shards import FORMAT as SHARDS_FORMAT
from .convert import Options, ProgressFactory, encode_many
from .selection import Selection

RUN_DIR = ".cvae"  # per-rank live failure logs, under out_dir
_DEFAULT_BYTES_PER_FRAME = 20_000  # only when no clip of the manifest says how long it is


# --- completeness ------------------------------------------------------------------------------

def is_complete(dst: Path) -> bool:
    """True when `dst` is a finished latent file (outputs appear atomically, so one that opens is whole)."""
    if not dst.is_file():
        return False
    try:
        LatentFile.open(dst).close()
    except CvaeError:
        return False
    return True


# --- planning ---------------------------------------------------------------------------------

def estimate_frames(clip: Clip) -> int | None:
    """The frames a row will yield, from its selection and the video's length (`media`; None: unknown)."""
    if clip.end is not None and clip.fps is None:
        return clip.end - (clip.start or 0)
    try:
        return clip.selection().expected_frames(media.probe(clip.path))
    except Exception:  # planning only: the row's own run says what is wrong with it
        return None


def split(weights: Sequence[float], world: int) -> list[int]:
    """The rank of each item: longest first onto the least-loaded rank (greedy LPT). Deterministic:
    equal weights keep their order, equal loads go to the lower rank. Max load <= 4/3 of optimal."""
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    heap = [(0.0, r) for r in range(world)]
    owner = [0] * len(weights)
    for i in order:
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + max(weights[i], 0), r))
    return owner


@dataclass
class Plan:
    """Who does what: every sample, whether it is already complete and which rank owns it, and the
    rows left out (too short for --clip-frames)."""

    samples: list[Sample]
    out_dir: Path
    complete: list[bool]
    owner: list[int]
    frames: list[float]  # estimates (planning only; 0 in one-process runs)
    world: int = 1
    left: list[Left] = field(default_factory=list)
    shards: bool = False

    @property
    def clips(self) -> list[Clip]:
        return [s.row for s in self.samples]

    def output(self, i: int) -> Path:
        """The per-file output of sample `i`."""
        return self.out_dir / Path(*self.samples[i].output.parts)

    def mine(self, rank: int) -> list[int]:
        return [i for i, r in enumerate(self.owner) if r == rank]

    def missing(self) -> int:
        """Samples still to encode whose input is not there: each will fail."""
        return sum(1 for i, s in enumerate(self.samples) if not self.complete[i] and not s.row.path.is_file())

    def lines(self) -> Iterator[str]:
        """Dry-run listing: what each sample will be, the inputs that are missing, the rows left out."""
        missing = 0
        for i, sample in enumerate(self.samples):
            clip = sample.row
            who = f" [rank {self.owner[i]}]" if self.world > 1 else ""
            where = f"sample {sample.key}" if self.shards else str(self.output(i))
            if self.complete[i]:
                yield f"skip    {where} (complete){who}"
            elif not clip.path.is_file():
                missing += 1
                yield f"missing {clip.path} (line {clip.line}): it will fail{who}"
            else:
                sel = clip.record()
                if sample.start is not None:
                    sel.update(start=sample.start, end=sample.end)
                if sample.bucket is not None:
                    sel["bucket"] = f"{sample.bucket[0]}x{sample.bucket[1]}"
                extra = ", ".join(f"{k} {sel[k]}" for k in ("start", "end", "fps", "size", "bucket") if k in sel)
                yield f"encode  {clip.path} -> {where}{f' ({extra})' if extra else ''}{who}"
        for left in self.left:
            yield f"leave   {left.reason} (line {left.row.line})"
        pending = self.complete.count(False) - missing
        yield (f"{pending} to encode, {len(self.samples) - pending - missing} complete, {missing} missing, "
               f"{len(self.left)} left out, {self.world} process(es)")
        if self.world > 1:
            loads = [0.0] * self.world
            for i, r in enumerate(self.owner):
                loads[r] += 0 if self.complete[i] else self.frames[i]
            yield "estimated frames per rank: " + ", ".join(f"{r}: {round(x)}" for r, x in enumerate(loads))


def _survey_row(row: Clip, index: int, out_dir: Path, cutting: Cutting, select: Selection, world: int,
                done: set[str] | None, overwrite: bool):
    """One row's samples, left-out reason, completeness, frame estimates and file size."""
    info = None
    if cutting.needs_media or world > 1:
        try:
            info = media.probe(row.path)
        except CvaeError:
            pass  # the sample's own encode reports it
    samples, left = row_samples(row, index, info, cutting, select)
    if done is None:
        complete = [not overwrite and is_complete(out_dir / Path(*s.output.parts)) for s in samples]
    else:
        complete = [s.key in done for s in samples]
    frames = [s.frames if s.frames is not None or world == 1 or info is not None else estimate_frames(row)
              for s in samples]
    size = 0
    if world > 1 and None in frames:
        try:
            size = row.path.stat().st_size
        except OSError:
            pass
    return samples, left, complete, frames, size


def make_plan(clips: list[Clip], out_dir: Path, dist: Dist = Dist(), overwrite: bool = False, *,
              cutting: Cutting = Cutting(), select: Selection = Selection(), done: set[str] | None = None) -> Plan:
    """Survey a strided share of the rows per rank, exchange the surveys, and split the pending
    samples. `done`: the keys already in finished shards (shards), or None (per-file outputs,
    complete when they open). CvaeError when two samples would share an output or a key, or an
    output would be one of the manifest's inputs."""
    out_dir = Path(out_dir)
    survey = {i: _survey_row(clips[i], i, out_dir, cutting, select, dist.world, done, overwrite)
              for i in range(dist.rank, len(clips), dist.world)}
    if dist.world > 1:
        survey = {k: v for part in dist.gather(survey) for k, v in part.items()}
    rows = [survey[i] for i in range(len(clips))]
    samples = [s for r in rows for s in r[0]]
    check_keys(samples, keys=done is not None)
    if done is None:
        refuse_unsafe([(s.row.path, out_dir / Path(*s.output.parts)) for s in samples])
    complete = [c for r in rows for c in r[2]]
    guesses = [(f, r[4]) for r in rows for f in r[3]]
    known = [(f, b) for f, b in guesses if f is not None and b]
    bytes_per_frame = (sum(b for _, b in known) / sum(f for f, _ in known)) if known else _DEFAULT_BYTES_PER_FRAME
    frames = [0.0 if c else float(f if f is not None else max(1.0, b / bytes_per_frame))
              for c, (f, b) in zip(complete, guesses)]
    pending = [i for i in range(len(samples)) if not complete[i]]
    owner = [i % dist.world for i in range(len(samples))]  # complete ones: anyone
    for i, r in zip(pending, split([frames[i] for i in pending], dist.world)):
        owner[i] = r
    left = [r[1] for r in rows if r[1] is not None]
    return Plan(samples, out_dir, complete, owner, frames, dist.world, left, shards=done is not None)


# --- running ----------------------------------------------------------------------------------

@dataclass
class Summary:
    clips: int = 0  # samples handled by this rank (or all, once merged)
    done: int = 0
    skipped: int = 0  # complete already
    failed: int = 0
    too_short: int = 0  # rows or clips left out: fewer frames than --clip-frames
    frames: int = 0  # encoded by this run
    seconds: float = 0.0  # wall time (the slowest rank's, once merged)
    world_size: int = 1
    ranks: list = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        out["frames_per_s"] = round(self.frames_per_s, 3)
        return out

    def line(self) -> str:
        short = f", {self.too_short} too short" if self.too_short else ""
        return (f"{self.done} done, {self.skipped} skipped, {self.failed} failed{short}; {self.frames} frames "
                f"in {self.seconds:.1f} s ({self.frames_per_s:.1f} frames/s)"
                + (f" on {self.world_size} processes" if self.world_size > 1 else ""))

    @classmethod
    def merge(cls, parts: Sequence[Summary], left: int = 0) -> Summary:
        return cls(clips=sum(p.clips for p in parts), done=sum(p.done for p in parts),
                   skipped=sum(p.skipped for p in parts), failed=sum(p.failed for p in parts),
                   too_short=left + sum(p.too_short for p in parts),
                   frames=sum(p.frames for p in parts), seconds=max((p.seconds for p in parts), default=0.0),
                   world_size=len(parts),
                   ranks=[{"rank": r, **{k: v for k, v in p.to_json().items() if k not in ("ranks", "world_size")}}
                          for r, p in enumerate(parts)])


@dataclass
class Outcome:
    """What one rank's run made: its summary, failures and samples left out."""

    summary: Summary
    failures: list[dict] = field(default_factory=list)
    left: list[dict] = field(default_factory=list)


Note = Callable[[str], None]


def failure_log(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / RUN_DIR / f"failures.rank-{rank}.jsonl"


class _FailureLog:
    """This rank's failures: kept for the summary, and appended to its live log as they happen."""

    def __init__(self, out_dir: Path, rank: int, note: Note):
        self.path, self.rank, self.note = failure_log(out_dir, rank), rank, note
        self.records: list[dict] = []
        self._file = None
        try:
            self.path.unlink(missing_ok=True)  # this rank's log of an earlier run; this run's starts afresh
        except OSError:
            pass

    def add(self, sample: Sample, error: BaseException | str) -> None:
        error = error if isinstance(error, str) else describe(error)
        record = {**sample.record(), "error": error, "rank": self.rank,
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.records.append(record)
        path = sample.row.path
        self.note(f"failed {error}" if str(path) in error else f"failed {path}: {error}")
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "w", encoding="utf-8")
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError:
            pass  # the record still reaches failures.jsonl at the end

    def __enter__(self) -> _FailureLog:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()


def index_row(shard: str, position: int, key: str, meta: dict, sample: Sample | None) -> dict:
    """A sample's line in index.jsonl; `sample` is None for one the manifest no longer lists."""
    return {"key": key, "shard": shard, "position": position,
            "row": None if sample is None else sample.index, "line": None if sample is None else sample.row.line,
            "clip": None if sample is None else sample.clip, "start": meta.get("start"), "end": meta.get("end"),
            "frames": (meta.get("end") or 0) - (meta.get("start") or 0), "latent_shape": meta.get("latent_shape"),
            "bucket": meta.get("bucket")}


def _work_dir(out_dir: Path, rank: int) -> Path:
    """Where a rank's latents wait to go into a shard; emptied at the start of its run."""
    work = Path(out_dir) / RUN_DIR / f"work.rank-{rank}"
    if work.is_dir():
        for p in work.iterdir():
            p.unlink(missing_ok=True)
    return work


def run_plan(model, plan: Plan, options: Options, select: Selection = Selection(), *, rank: int = 0,
             seed: int | None = None, save_logvar: bool = False, overwrite: bool = False, batch_size: int = 1,
             shard_size: int = 1000, note: Note | None = None,
             progress: ProgressFactory | None = None) -> Outcome:
    """Encode this rank's share of `plan`, `batch_size` samples of one model size at a time, into
    per-file outputs or (`plan.shards`) this rank's shards. A sample that fails on its own is
    recorded and the run goes on (`convert.per_input`); anything else raises."""
    from .checkpoints import model_id
    from .shards import ShardWriter

    note = note or (lambda message: None)
    want_id = model_id(model)
    summary = Summary(world_size=1)
    left: list[dict] = []
    t0 = time.perf_counter()
    work = _work_dir(plan.out_dir, rank) if plan.shards else None
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(_FailureLog(plan.out_dir, rank, note))
        writer = stack.enter_context(ShardWriter(plan.out_dir, rank, shard_size)) if plan.shards else None
        pending = []
        for i in plan.mine(rank):
            summary.clips += 1
            if plan.shards:
                if plan.complete[i]:
                    summary.skipped += 1
                else:
                    pending.append(i)
                continue
            sample, dst = plan.samples[i], plan.output(i)
            remove_stale(dst)
            if not plan.complete[i] or overwrite:
                pending.append(i)
                continue
            try:
                with LatentFile.open(dst) as done:
                    made_by = done.meta.model_id
            except CvaeError as e:
                log.add(sample, e)
                continue
            if made_by != want_id:
                log.add(sample, f"{dst} exists but was encoded with weights {made_by}, not {want_id} "
                                "(use --overwrite or another --out-dir)")
            else:
                summary.skipped += 1

        def destination(i: int) -> Path:
            return work / f"{plan.samples[i].key}{SUFFIX}" if plan.shards else plan.output(i)

        readers = stack.enter_context(ClipReaders([plan.samples[i] for i in pending], select))
        jobs = [(readers.opener(plan.samples[i]), destination(i), plan.samples[i].selection(select)) for i in pending]
        started = time.perf_counter()
        for k, outcome in encode_many(model, jobs, options, batch_size=batch_size, seed=seed,
                                      save_logvar=save_logvar, progress=progress):
            sample, dst = plan.samples[pending[k]], jobs[k][1]
            if isinstance(outcome, BaseException):
                log.add(sample, outcome)
                continue
            if sample.start is not None and outcome.frames < sample.end - sample.start:
                dst.unlink(missing_ok=True)  # the video ended before the clip did: a shorter tail
                left.append({**sample.record(), "reason": f"{sample.row.path}: the video ended after "
                             f"{outcome.frames} of the clip's {sample.end - sample.start} frames"})
                summary.too_short += 1
                note(f"left out {sample.key}: {left[-1]['reason']}")
                continue
            if writer is not None:
                with LatentFile.open(dst) as latent:
                    meta = sample.meta(latent.meta, latent.shape, select)
                writer.add(sample.key, dst, meta)
                dst.unlink()
                where = f"{sample.row.path} -> {sample.key}"
            else:
                where = f"{sample.row.path} -> {dst}"
            summary.done += 1
            summary.frames += outcome.frames
            rate = summary.frames / max(time.perf_counter() - started, 1e-9)
            note(f"done {where} ({outcome.frames} frames, {rate:.1f} frames/s)")
        summary.failed = len(log.records)
        failures = log.records
    summary.seconds = time.perf_counter() - t0
    if work is not None:
        with contextlib.suppress(OSError):
            work.rmdir()
    return Outcome(summary, failures, left)


def finish(dist: Dist, out_dir: Path, outcome: Outcome, plan: Plan | None = None) -> Summary:
    """Gather every rank's outcome; rank 0 writes failures.jsonl, skipped.jsonl, summary.json and,
    with shards, index.jsonl (every sample of every finished shard, one shard at a time), all
    atomically, and removes the per-rank logs. Returns the merged summary on every rank."""
    from . import shards

    parts = dist.gather(outcome)
    planned = [] if plan is None else [left.record() for left in plan.left]
    total = Summary.merge([p.summary for p in parts], left=len(planned))
    if dist.rank == 0:
        out_dir = Path(out_dir)
        every = sorted((f for p in parts for f in p.failures), key=lambda f: f.get("line", 0))
        with atomic_path(out_dir / "failures.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(f) + "\n" for f in every), encoding="utf-8")
        skipped = sorted(planned + [r for p in parts for r in p.left], key=lambda f: f.get("line", 0))
        if skipped or (out_dir / "skipped.jsonl").exists():
            with atomic_path(out_dir / "skipped.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(f) + "\n" for f in skipped), encoding="utf-8")
        if plan is not None and plan.shards:
            by_key = {s.key: s for s in plan.samples}
            shards.write_index(out_dir, (index_row(shard, position, key, meta, by_key.get(key))
                                         for shard, position, key, meta in shards.iter_samples(out_dir)))
        with atomic_path(out_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(total.to_json(), indent=1) + "\n", encoding="utf-8")
        for p in (out_dir / RUN_DIR).glob("failures.rank-*.jsonl"):
            p.unlink(missing_ok=True)
        try:
            (out_dir / RUN_DIR).rmdir()
        except OSError:
            pass
    return total


@dataclass(frozen=True)
class Sharding:
    """`--shards`: WebDataset tar shards of at most `size` samples instead of one file a sample."""

    size: int = 1000

    def __post_init__(self):
        if self.size < 1:
            raise CvaeError(f"--shard-size {self.size}: must be at least 1")


@dataclass(frozen=True)
class Layout:
    """How a dataset is laid out: how rows become samples, and shards (None: a file a sample)."""

    cutting: Cutting = Cutting()
    sharding: Sharding | None = None


def settings(model_identity: str, cutting: Cutting, select: Selection, seed: int | None,
             save_logvar: bool) -> dict:
    """What shards record about how they were made (`shards.json`): a run with other settings is
    refused, since its samples would not match the ones already there."""
    chosen = {k: getattr(select, k) for k in ("start", "end", "fps", "size", "max_side", "allow_partial")}
    chosen["size"] = None if chosen["size"] is None else f"{chosen['size'][0]}x{chosen['size'][1]}"
    return json.loads(json.dumps({"format": SHARDS_FORMAT, "weights": model_identity, "cutting": cutting.to_json(),
                                  "selection": chosen, "sample_seed": seed, "save_logvar": save_logvar}))


def prepare(clips: list[Clip], out_dir: Path, dist: Dist = Dist(), *, cutting: Cutting = Cutting(),
            select: Selection = Selection(), sharding: Sharding | None = None, overwrite: bool = False,
            made_with: dict | None = None) -> Plan:
    """The plan for this job; with shards, a sample is complete when a finished shard holds its
    key. With shards and `made_with` (the run's `settings`; None for a dry run, which changes
    nothing), rank 0 first refuses an out_dir whose shards were made otherwise (unless
    `overwrite`, which removes them), removes unfinished shards and records the settings; then
    every rank lists its share of the finished shards (a damaged one is renamed aside, so that its
    samples are redone)."""
    from . import shards

    out_dir = Path(out_dir)
    if sharding is None:
        return make_plan(clips, out_dir, dist, overwrite, cutting=cutting, select=select)
    if dist.rank == 0 and made_with is not None:
        wipe = shards.check_settings(out_dir, made_with, overwrite)
        if wipe:
            shards.clear(out_dir)
        shards.remove_temporaries(out_dir)
        for work in (out_dir / RUN_DIR).glob("work.rank-*"):  # latents a killed run left, any world size's
            shutil.rmtree(work, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        shards.write_settings(out_dir, made_with)
    dist.barrier("rank 0 to check the output folder")
    listing = shards.Listing()
    if not (overwrite and made_with is None):
        listing = shards.list_shards(out_dir, dist.rank, dist.world, rename=made_with is not None)
    if dist.world > 1:
        parts, listing = dist.gather(listing), shards.Listing()
        for part in parts:
            listing.merge(part)
    return make_plan(clips, out_dir, dist, overwrite, cutting=cutting, select=select, done=set(listing.keys))


@dataclass(frozen=True)
class DatasetJob:
    """A whole dataset job, as `cvae encode --manifest` runs it: the manifest's rows, where the
    outputs go, how each row is selected, cut into samples and stored.

        job = DatasetJob(read_manifest("clips.csv"), Path("latents"))
        summary = job.run(Tokenizer.load(direction="encode"))
    """

    clips: list[Clip]
    out_dir: Path
    select: Selection = Selection()
    cutting: Cutting = Cutting()
    sharding: Sharding | None = None  # None: a file a sample
    seed: int | None = None  # store a posterior sample of this seed instead of the mean
    save_logvar: bool = False
    overwrite: bool = False
    batch_size: int = 1

    def plan(self, dist: Dist = Dist(), made_with: dict | None = None) -> Plan:
        """What this job would do, and what is done already (no output is changed without
        `made_with`; see `prepare`)."""
        return prepare(self.clips, self.out_dir, dist, cutting=self.cutting, select=self.select,
                       sharding=self.sharding, overwrite=self.overwrite, made_with=made_with)

    def run(self, tok, dist: Dist | None = None, *, note: Note | None = None,
            progress: ProgressFactory | None = None) -> Summary:
        """Plan, encode this process's share with the Tokenizer `tok`, and gather the summary
        (`dist` already started, or one process)."""
        dist = dist or Dist()
        made_with = None if self.sharding is None else \
            settings(tok.model_id, self.cutting, self.select, self.seed, self.save_logvar)
        plan = self.plan(dist, made_with)
        outcome = run_plan(tok.model, plan, tok.policy, self.select, rank=dist.rank, seed=self.seed,
                           save_logvar=self.save_logvar, overwrite=self.overwrite, batch_size=self.batch_size,
                           shard_size=self.sharding.size if self.sharding is not None else 1000, note=note,
                           progress=progress)
        return finish(dist, Path(self.out_dir), outcome, plan)


def line_writer(rank: int, world: int, stream=None) -> Note:
    """Per-clip lines for logs and many processes: `[rank r] ...`, each line one write() call so
    lines from different processes sharing a terminal or log file never interleave mid-line."""
    stream = stream or sys.stderr
    prefix = rank_prefix(rank, world)

    def write(message: str) -> None:
        data = (prefix + message.replace("\n", " ") + "\n").encode("utf-8", "replace")
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            stream.write(data.decode("utf-8"))
            stream.flush()
            return
        stream.flush()
        os.write(fd, data)

    return write
