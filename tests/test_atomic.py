"""Atomic outputs: all or nothing, readable by others as the umask says, and leftovers of a
killed writer found and removed."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from cvae_cli.atomic import FILE_MODE, atomic_path, remove_stale
from cvae_cli.errors import CvaeError
from conftest import REPO


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_output_appears_whole_or_not_at_all(tmp_path):
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("done")
        assert tmp.name.startswith(".a.txt.") and tmp.name.endswith(".part.txt") and tmp.parent == tmp_path
    assert (tmp_path / "a.txt").read_text() == "done"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(CvaeError, match="cannot write"):
        with atomic_path(tmp_path / "file" / "c.txt"):
            pass


def test_outputs_get_the_umask_permissions_not_the_temporary_files_0600(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    assert FILE_MODE == 0o666 & ~mask
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
        assert mode(tmp) == 0o600  # what mkstemp gives; nobody else may read a half-written file
    assert mode(tmp_path / "a.txt") == FILE_MODE
    # another umask, in a fresh process (the mode is read once, at import)
    code = ("import os; os.umask(0o002); from pathlib import Path; from cvae_cli.atomic import atomic_path\n"
            f"with atomic_path(Path({str(tmp_path / 'b.txt')!r})) as t: t.write_text('x')")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    assert mode(tmp_path / "b.txt") == 0o664


def test_remove_stale_removes_only_leftovers_of_that_output(tmp_path):
    dst = tmp_path / "a.safetensors"
    stale = [tmp_path / ".a.safetensors.k3j_x1.part.safetensors", tmp_path / ".a.safetensors.zz.latent.raw",
             tmp_path / ".a.safetensors.zy.logvar.raw"]
    keep = [tmp_path / ".ab.safetensors.q.latent.raw", tmp_path / "a.safetensors.notes",
            tmp_path / ".a.safetensors.k3j_x1.part.mp4"]
    for p in stale + keep:
        p.write_bytes(b"x")
    assert sorted(remove_stale(dst)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
