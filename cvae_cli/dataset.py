"""Whole datasets: manifests, planning who encodes what, resumable runs, the summary.

A manifest lists clips; every clip's output mirrors its path relative to the manifest's folder
under `out_dir` (`videos/a/b.mp4` -> `OUT/videos/a/b.safetensors`). A run is resumable because
outputs appear atomically (`latents.LatentWriter`): an output that opens as a latent file is
complete and is skipped; anything else is (re)done. Stale temporary files of a killed run are
removed by the rank that owns the output before it touches it (`atomic.remove_stale`). Run one
job per output folder at a time.

Many processes (`distributed.Dist`, under torchrun): every rank reads the whole manifest, surveys
a strided share of it (is the output complete? how many frames?), and the surveys are exchanged,
so every rank computes the same plan: `split` assigns pending clips greedily, longest first, to
the least-loaded rank (LPT), ties broken by manifest order and rank number, so the split is
deterministic and balanced by frame count. Frame counts come from the container header (minus
`start`, or `end - start` when the manifest gives `end`, scaled by a manifest `fps`); a clip whose
header says nothing is estimated from its file size at the mean bytes-per-frame of the others.

A clip that fails on its own (`pipeline.per_input`: unreadable, truncated, out of memory) is
appended, as it happens, to `OUT/.cvae/failures.rank-R.jsonl` (so an interrupted run leaves a
record) and the run goes on; any other failure ends the run (and, through `Dist.session`, every
rank). At the end rank 0 gathers all failures into `OUT/failures.jsonl` and the totals into
`OUT/summary.json` (both written atomically) and removes the per-rank logs.
"""
from __future__ import annotations

import datetime
import heapq
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Sequence

from . import media
from .atomic import atomic_path, remove_stale
from .distributed import Dist
from .errors import CvaeError, describe
from .latents import LatentFile
from .manifest import SUFFIX, Clip, mirror, read_manifest  # noqa: F401 (public names of this module)
from .outputs import refuse_unsafe
from .pipeline import Options, ProgressFactory, Selection, encode_many

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
    """The frames a clip will yield, from its selection and the container's claim (None: unknown)."""
    if clip.end is not None and clip.fps is None:
        return clip.end - (clip.start or 0)
    try:
        return clip.selection().expected_frames(media.probe(clip.path))
    except Exception:  # planning only: the clip's own run says what is wrong with it
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
    """Who does what: for each clip, whether its output is already complete and which rank owns it."""

    clips: list[Clip]
    out_dir: Path
    complete: list[bool]
    owner: list[int]
    frames: list[float]  # estimates (planning only; empty lists of 0 in one-process runs)
    world: int = 1

    def output(self, i: int) -> Path:
        return self.out_dir / Path(*self.clips[i].output.parts)

    def mine(self, rank: int) -> list[int]:
        return [i for i, r in enumerate(self.owner) if r == rank]

    def missing(self) -> int:
        """Inputs still to encode that are not there: each will fail."""
        return sum(1 for i, clip in enumerate(self.clips) if not self.complete[i] and not clip.path.is_file())

    def lines(self) -> Iterator[str]:
        """Dry-run listing: what each clip will be, and the inputs that are missing."""
        missing = 0
        for i, clip in enumerate(self.clips):
            who = f" [rank {self.owner[i]}]" if self.world > 1 else ""
            if self.complete[i]:
                yield f"skip    {self.output(i)} (complete){who}"
            elif not clip.path.is_file():
                missing += 1
                yield f"missing {clip.path} (line {clip.line}): it will fail{who}"
            else:
                sel = clip.record()
                extra = ", ".join(f"{k} {sel[k]}" for k in ("start", "end", "fps", "size") if k in sel)
                yield f"encode  {clip.path} -> {self.output(i)}{f' ({extra})' if extra else ''}{who}"
        pending = self.complete.count(False) - missing
        yield (f"{pending} to encode, {len(self.clips) - pending - missing} complete, {missing} missing, "
               f"{self.world} process(es)")
        if self.world > 1:
            loads = [0.0] * self.world
            for i, r in enumerate(self.owner):
                loads[r] += 0 if self.complete[i] else self.frames[i]
            yield "estimated frames per rank: " + ", ".join(f"{r}: {round(x)}" for r, x in enumerate(loads))


def make_plan(clips: list[Clip], out_dir: Path, dist: Dist = Dist(), overwrite: bool = False) -> Plan:
    """Survey a strided share per rank, exchange the surveys, and split the pending clips.
    CvaeError when an output would be one of the manifest's inputs."""
    out_dir = Path(out_dir)
    writers: dict = {}
    for clip in clips:
        other = writers.setdefault(clip.output, clip)
        if other is not clip:
            raise CvaeError(f"manifest lines {other.line} and {clip.line} both write {clip.output} "
                            "(give them an `output` column)")
    refuse_unsafe([(clip.path, out_dir / Path(*clip.output.parts)) for clip in clips])
    survey = {}
    for i in range(dist.rank, len(clips), dist.world):
        dst = out_dir / Path(*clips[i].output.parts)
        done = not overwrite and is_complete(dst)
        frames = None if done or dist.world == 1 else estimate_frames(clips[i])
        size = 0
        if frames is None and not done and dist.world > 1:
            try:
                size = clips[i].path.stat().st_size
            except OSError:
                pass
        survey[i] = (done, frames, size)
    if dist.world > 1:
        survey = {k: v for part in dist.gather(survey) for k, v in part.items()}
    complete = [survey[i][0] for i in range(len(clips))]
    known = [(f, s) for d, f, s in survey.values() if f is not None and s]
    bytes_per_frame = (sum(s for _, s in known) / sum(f for f, _ in known)) if known else _DEFAULT_BYTES_PER_FRAME
    frames = [0.0 if d else float(f if f is not None else max(1.0, s / bytes_per_frame))
              for d, f, s in (survey[i] for i in range(len(clips)))]
    pending = [i for i in range(len(clips)) if not complete[i]]
    owner = [i % dist.world for i in range(len(clips))]  # complete ones: whoever surveyed them
    for i, r in zip(pending, split([frames[i] for i in pending], dist.world)):
        owner[i] = r
    return Plan(clips, out_dir, complete, owner, frames, dist.world)


# --- running ----------------------------------------------------------------------------------

@dataclass
class Summary:
    clips: int = 0  # handled by this rank (or all, once merged)
    done: int = 0
    skipped: int = 0
    failed: int = 0
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
        return (f"{self.done} done, {self.skipped} skipped, {self.failed} failed; {self.frames} frames "
                f"in {self.seconds:.1f} s ({self.frames_per_s:.1f} frames/s)"
                + (f" on {self.world_size} processes" if self.world_size > 1 else ""))

    @classmethod
    def merge(cls, parts: Sequence[Summary]) -> Summary:
        return cls(clips=sum(p.clips for p in parts), done=sum(p.done for p in parts),
                   skipped=sum(p.skipped for p in parts), failed=sum(p.failed for p in parts),
                   frames=sum(p.frames for p in parts), seconds=max((p.seconds for p in parts), default=0.0),
                   world_size=len(parts),
                   ranks=[{"rank": r, **{k: v for k, v in p.to_json().items() if k not in ("ranks", "world_size")}}
                          for r, p in enumerate(parts)])


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

    def add(self, clip: Clip, error: BaseException | str) -> None:
        error = error if isinstance(error, str) else describe(error)
        record = {**clip.record(), "error": error, "rank": self.rank,
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.records.append(record)
        self.note(f"failed {error}" if str(clip.path) in error else f"failed {clip.path}: {error}")
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


def run_plan(model, plan: Plan, options: Options, select: Selection = Selection(), *, rank: int = 0,
             seed: int | None = None, save_logvar: bool = False, overwrite: bool = False, batch_size: int = 1,
             note: Note | None = None, progress: ProgressFactory | None = None) -> tuple[Summary, list[dict]]:
    """Encode this rank's share of `plan`, `batch_size` clips of one model size at a time. A clip
    that fails on its own is recorded and the run goes on (`pipeline.per_input`); anything else
    raises. Returns this rank's summary and failures."""
    from .checkpoints import model_id

    note = note or (lambda message: None)
    want_id = model_id(model)
    summary = Summary(world_size=1)
    t0 = time.perf_counter()
    with _FailureLog(plan.out_dir, rank, note) as log:
        pending = []
        for i in plan.mine(rank):
            clip, dst = plan.clips[i], plan.output(i)
            summary.clips += 1
            remove_stale(dst)
            if not plan.complete[i] or overwrite:
                pending.append(i)
                continue
            try:
                with LatentFile.open(dst) as done:
                    made_by = done.meta.model_id
            except CvaeError as e:
                log.add(clip, e)
                continue
            if made_by != want_id:
                log.add(clip, f"{dst} exists but was encoded with weights {made_by}, not {want_id} "
                              "(use --overwrite or another --out-dir)")
            else:
                summary.skipped += 1

        jobs = [(plan.clips[i].path, plan.output(i), plan.clips[i].selection(select)) for i in pending]
        started = time.perf_counter()
        for k, outcome in encode_many(model, jobs, options, batch_size=batch_size, seed=seed,
                                      save_logvar=save_logvar, progress=progress):
            clip, dst = plan.clips[pending[k]], jobs[k][1]
            if isinstance(outcome, BaseException):
                log.add(clip, outcome)
                continue
            summary.done += 1
            summary.frames += outcome.frames
            rate = summary.frames / max(time.perf_counter() - started, 1e-9)
            note(f"done {clip.path} -> {dst} ({outcome.frames} frames, {rate:.1f} frames/s)")
        summary.failed = len(log.records)
        failures = log.records
    summary.seconds = time.perf_counter() - t0
    return summary, failures


def finish(dist: Dist, out_dir: Path, summary: Summary, failures: list[dict]) -> Summary:
    """Gather every rank's summary and failures; rank 0 writes failures.jsonl and summary.json
    (atomically) and removes the per-rank logs. Returns the merged summary on every rank."""
    parts = dist.gather((summary, failures))
    total = Summary.merge([p[0] for p in parts])
    if dist.rank == 0:
        out_dir = Path(out_dir)
        every = sorted((f for p in parts for f in p[1]), key=lambda f: f.get("line", 0))
        with atomic_path(out_dir / "failures.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(f) + "\n" for f in every), encoding="utf-8")
        with atomic_path(out_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(total.to_json(), indent=1) + "\n", encoding="utf-8")
        for p in (out_dir / RUN_DIR).glob("failures.rank-*.jsonl"):
            p.unlink(missing_ok=True)
        try:
            (out_dir / RUN_DIR).rmdir()
        except OSError:
            pass
    return total


def run_manifest(model, clips: list[Clip], out_dir: Path, options: Options, select: Selection = Selection(), *,
                 dist: Dist | None = None, seed: int | None = None, save_logvar: bool = False,
                 overwrite: bool = False, batch_size: int = 1, note: Note | None = None,
                 progress: ProgressFactory | None = None) -> Summary:
    """The whole dataset job for this process: plan, encode this rank's share, gather the summary
    (`dist` already started, or one process)."""
    dist = dist or Dist()
    plan = make_plan(clips, out_dir, dist, overwrite)
    summary, failures = run_plan(model, plan, options, select, rank=dist.rank, seed=seed,
                                 save_logvar=save_logvar, overwrite=overwrite, batch_size=batch_size, note=note,
                                 progress=progress)
    return finish(dist, out_dir, summary, failures)


def line_writer(rank: int, world: int, stream=None) -> Note:
    """Per-clip lines for logs and many processes: `[rank r] ...`, each line one write() call so
    lines from different processes sharing a terminal or log file never interleave mid-line."""
    stream = stream or sys.stderr
    prefix = f"[rank {rank}] " if world > 1 else ""

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
