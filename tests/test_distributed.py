"""Many processes: one rank's failure ends the whole job quickly, with a line naming the rank.

Two gloo processes on this machine, started as torchrun starts them (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), but without torchrun: its agent would end the others itself when one
exits, and the point is that cvae does so on its own (srun without torchrun, a rank stuck in a
collective, a rank killed outright)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cvae_cli.distributed import Dist
from conftest import REPO, cvae_process, free_port, make_video

# rank FAILING fails at the chosen point while the other has finished its share and waits for it
SCRIPT = """
import os, sys, time
from cvae_cli import interrupt
from cvae_cli.distributed import Dist
how, failing = sys.argv[1], int(sys.argv[2])
dist = Dist.from_env()
try:
    with dist.session("cpu"):
        dist.barrier()
        if dist.rank == failing:
            if how == "kill":
                os.kill(os.getpid(), 9)
            raise RuntimeError("boom")
        if how == "stuck":
            time.sleep(600)  # no safe point: as inside a collective
        dist.gather("done")
except interrupt.Interrupted as e:
    print(f"error: [rank {dist.rank}] {e}", file=sys.stderr)
    sys.exit(e.status)
except RuntimeError as e:
    print(f"error: [rank {dist.rank}] {e}", file=sys.stderr)
    sys.exit(1)
"""


def two_ranks(how: str, failing: int, **env) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank in range(2):
        e = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
             "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1", **env}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, how, str(failing)], env=e, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:  # the limit only keeps a broken mechanism from hanging the suite
        out, err = p.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.mark.parametrize("failing", [1, 0])  # rank 0 also holds the rendezvous store
def test_a_rank_that_raises_stops_the_other_waiting_for_it(failing):
    results = two_ranks("raise", failing)
    assert results[failing].returncode == 1 and "boom" in results[failing].stderr
    other = results[1 - failing]
    assert other.returncode == 1, other.stderr
    assert other.stderr.strip().splitlines()[-1] == (f"error: [rank {1 - failing}] stopped: rank {failing} "
                                                     "failed: RuntimeError: boom")


def test_a_rank_killed_outright_is_noticed_by_its_silence():
    results = two_ranks("kill", 1, CVAE_DIST_SILENCE_S="3")
    assert results[1].returncode == -9
    assert results[0].returncode == 1, results[0].stderr
    assert "error: [rank 0] stopped: rank 1 failed: silent for" in results[0].stderr


def test_a_rank_stuck_without_a_safe_point_is_ended_by_its_watch():
    results = two_ranks("stuck", 1, CVAE_DIST_GRACE_S="2")
    assert results[0].returncode == 1, results[0].stderr
    assert results[0].stderr.strip().splitlines()[-1] == ("error: [rank 0] stopped: rank 1 failed: "
                                                          "RuntimeError: boom")


def test_one_process_needs_no_process_group():
    dist = Dist()
    with dist.session("cpu"):
        dist.barrier()
        assert dist.gather(3) == [3] and not dist.started


def test_a_failing_rank_under_torchrun_ends_the_encode_job(tmp_path):
    from cvae_cli.checkpoints import save_model
    from conftest import random_model

    weights = save_model(random_model(norm="frame"), tmp_path / "tiny.safetensors")
    names = [f"v{i}.mp4" for i in range(4)]
    for name in names:
        make_video(tmp_path / name, frames=5, width=64, height=48)
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    cmd, env = cvae_process("encode", "--manifest", tmp_path / "list.txt", "--out-dir", tmp_path / "z", "-w", weights,
                            "--device", "cpu", "--chunk", "4", torchrun=2, inject="fail:1")
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert lines.count("error: [rank 1] RuntimeError: injected failure [set CVAE_DEBUG=1 for the traceback]") == 1, \
        r.stderr
    assert not (tmp_path / "z" / "summary.json").exists()  # no summary of a job that did not finish
