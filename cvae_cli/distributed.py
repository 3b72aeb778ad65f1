"""This process's place in a torchrun job, and what makes one rank's failure end the whole job.

Without torchrun (no WORLD_SIZE) this is rank 0 of 1 and nothing here touches torch.distributed.

Failure of any rank ends the job within a minute, with one line naming the rank. Every rank, while
in `Dist.session`, runs a `RankWatch` thread that talks through the job's rendezvous store:
- it bumps its own heartbeat every second and watches its ring neighbour's (rank r watches r+1);
- a rank whose work raises posts its one-line error (`Dist.fail`, done by `session`) before it
  leaves;
- a watch that sees a posted failure, or its neighbour silent for CVAE_DIST_SILENCE_S (30 s: a
  rank killed outright, or its machine gone), posts that too, and asks its own process to stop at
  the next safe point (`interrupt.request`): between chunks, tiles and clips, and while waiting in
  `Dist.barrier`. A process that does not get there within CVAE_DIST_GRACE_S (15 s; it may be
  stuck inside a collective) is ended by the watch with its one line.
Ranks that finish early wait for the others in `barrier`, in Python, so they too notice a failure;
CVAE_DIST_TIMEOUT_S (48 h) bounds how long they wait for a slow but living rank.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from . import interrupt
from .errors import CvaeError, describe

POLL_S = 0.25  # how often a waiting rank looks at the others
BEAT_S = 1.0  # how often a rank says it is alive


def rank_prefix(rank: int | str | None = None, world: int | str | None = None) -> str:
    """`[rank r] ` when several processes speak (by default: torchrun's RANK and WORLD_SIZE), so
    each line says whose it is; nothing for one process."""
    world = os.environ.get("WORLD_SIZE", "1") if world is None else world
    rank = os.environ.get("RANK", "0") if rank is None else rank
    return f"[rank {rank}] " if str(world) not in ("", "1") else ""


def _seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise CvaeError(f"{name} must be a number of seconds") from None


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun).

    Use `session` around the work: it joins the process group, watches the other ranks, and on
    the way out posts this rank's failure (if any) and leaves the group."""

    rank: int = 0
    world: int = 1
    local_rank: int | None = None
    started: bool = False
    _watch: RankWatch | None = field(default=None, repr=False)
    _barriers: int = field(default=0, repr=False)

    @classmethod
    def from_env(cls) -> Dist:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = os.environ.get("LOCAL_RANK")
            local_rank = int(local) if local is not None else None
        except ValueError:
            raise CvaeError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers") from None
        if world < 1 or not 0 <= rank < world:
            raise CvaeError(f"RANK={rank} is not within WORLD_SIZE={world}")
        return cls(rank, world, local_rank)

    def device(self, device: str) -> str:
        """`auto`/`cuda` -> `cuda:LOCAL_RANK` under torchrun; an explicit `cuda:N` or `cpu` stays
        (`device.resolve`, the one place "auto" is decided; CvaeError for a GPU that is not there)."""
        from .device import resolve

        return str(resolve(device, local_rank=self.local_rank)[0])

    def start(self, device: str) -> None:
        """Join the process group (only when WORLD_SIZE > 1): nccl for CUDA devices, else gloo
        (CVAE_DIST_BACKEND overrides); then watch the other ranks."""
        if self.world == 1 or self.started:
            return
        import torch
        import torch.distributed as td

        from .device import is_cuda

        cuda = is_cuda(device)
        if cuda:
            torch.cuda.set_device(torch.device(device))
        backend = os.environ.get("CVAE_DIST_BACKEND") or ("nccl" if cuda else "gloo")
        timeout = datetime.timedelta(seconds=_seconds("CVAE_DIST_TIMEOUT_S", 48 * 3600))
        try:
            td.init_process_group(backend=backend, timeout=timeout)
        except (RuntimeError, ValueError) as e:  # no MASTER_ADDR, unreachable rendezvous, bad backend
            raise CvaeError(f"cannot join the torch.distributed group (rank {self.rank} of {self.world}, "
                            f"{backend}): {describe(e)}") from None
        self.started = True
        store = td.PrefixStore(f"cvae/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/",
                               td.distributed_c10d._get_default_store())
        self._watch = RankWatch(store, self.rank, self.world)
        self._watch.start()

    def barrier(self, what: str = "the other ranks") -> None:
        """Wait until every rank got here, noticing meanwhile any rank's failure (which raises
        `interrupt.Interrupted`) and a wait past CVAE_DIST_TIMEOUT_S (CvaeError)."""
        if not self.started:
            return
        self._barriers += 1
        key, store = f"barrier/{self._barriers}", self._watch.store
        store.add(key, 1)
        deadline = time.monotonic() + _seconds("CVAE_DIST_TIMEOUT_S", 48 * 3600)
        while store.add(key, 0) < self.world:
            interrupt.check()
            if time.monotonic() > deadline:
                raise CvaeError(f"rank {self.rank} waited past CVAE_DIST_TIMEOUT_S for {what}")
            time.sleep(POLL_S)

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, on every rank, in rank order (after a `barrier`)."""
        if not self.started:
            return [obj]
        import torch.distributed as td

        self.barrier("the other ranks to finish")
        out: list = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def fail(self, error: BaseException | str) -> None:
        """Tell the other ranks this one failed (they stop within a minute, naming it), and give
        them a moment to read it: the store may live in this process (rank 0 without torchrun)."""
        if self._watch is not None:
            self._watch.post(self.rank, error if isinstance(error, str) else describe(error))
            self._watch.wait_seen(3 * BEAT_S)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self.started:
            import torch.distributed as td

            td.destroy_process_group()
            self.started = False

    @contextmanager
    def session(self, device: str) -> Iterator[Dist]:
        """`start`, then the work; a failure inside is posted to the other ranks before it
        propagates (unless it is the stop another rank's failure caused); always `close`."""
        self.start(device)
        try:
            yield self
        except (Exception, KeyboardInterrupt) as e:
            if not (self._watch is not None and self._watch.stopped_by is not None):
                self.fail(e)
            raise
        finally:
            self.close()


class RankWatch:
    """A thread that keeps this rank's heartbeat and watches for other ranks' failures (see the
    module docstring). `store` is the job's c10d store; every key lives under one prefix."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.neighbour = (rank + 1) % world
        self.silence_s = _seconds("CVAE_DIST_SILENCE_S", 30)
        self.grace_s = _seconds("CVAE_DIST_GRACE_S", 15)
        self.stopped_by: str | None = None  # the failure that stopped this rank
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cvae-rank-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def post(self, rank: int, message: str) -> None:
        """Record that `rank` failed with `message`; the first post is the one every rank reports."""
        try:
            if self.store.add("failed", 1) == 1:
                self.store.set("failure", f"rank {rank} failed: {message}")
        except Exception:
            pass  # the store is gone with rank 0 or the launcher: the others notice that themselves

    def wait_seen(self, timeout: float) -> None:
        """Wait until every other rank's watch has seen the posted failure, or `timeout`."""
        deadline = time.monotonic() + timeout
        try:
            while self.store.add("seen", 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except Exception:
            pass

    def _run(self) -> None:
        last_beat, last_change = -1, time.monotonic()
        while not self._done.wait(BEAT_S):
            try:
                self.store.add(f"beat/{self.rank}", 1)
                if self.store.add("failed", 0):
                    reason = self.store.get("failure").decode()
                    if not reason.startswith(f"rank {self.rank} "):
                        self.store.add("seen", 1)
                    break
                beat = self.store.add(f"beat/{self.neighbour}", 0)
            except Exception as e:
                reason = f"lost the job's rendezvous store ({describe(e)}): rank 0 or the launcher stopped"
                break
            now = time.monotonic()
            if beat != last_beat:
                last_beat, last_change = beat, now
            elif now - last_change > self.silence_s:
                reason = f"rank {self.neighbour} failed: silent for {now - last_change:.0f} s (killed, or its machine is gone)"
                self.post(self.neighbour, f"silent for {now - last_change:.0f} s (killed, or its machine is gone)")
                break
        else:
            return  # stopped by its own rank, which is leaving
        self.stopped_by = reason
        interrupt.request(f"stopped: {reason}", status=1)
        if not self._done.wait(self.grace_s):  # stuck (inside a collective?): end the process here
            sys.stderr.write(f"error: [rank {self.rank}] stopped: {reason}\n")
            sys.stderr.flush()
            os._exit(1)
