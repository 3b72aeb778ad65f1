"""Atomic output: write beside the target, rename when complete, remove on any failure.

An interrupted run (exception, Ctrl-C, SIGTERM) never leaves a half-written file under the name the
user asked for. Temporary files are hidden dotfiles named after their target
(`.NAME.XXXX.part.SUFFIX`, `.NAME.XXXX.latent.raw`), so that a later run can find and remove what a
killed one (SIGKILL, power loss) left behind: `remove_stale`.

A finished output gets the permissions the user's umask gives a normal file (a temporary file is
created 0600), so other users and other ranks on shared storage can read it.
"""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import CvaeError


def _file_mode() -> int:
    """0666 less the umask. Read once, at import, while no other thread can create files: reading
    the umask means setting it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()
_STALE_ENDINGS = (".raw",)  # plus ".part" + the target's suffix


def temp_beside(target: Path, kind: str) -> tuple[Path, IO[bytes]]:
    """A new hidden temporary file beside `target` (same disk, so a rename is atomic), open for
    writing: `.NAME.XXXX.KIND`."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".{kind}", dir=target.parent)
    except OSError as e:
        raise CvaeError(f"cannot write {target}: {e.strerror or e}") from None
    return Path(tmp), os.fdopen(fd, "wb")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto `target`."""
    target = Path(target)
    tmp, f = temp_beside(target, "part" + target.suffix)
    f.close()
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_stale(target: Path) -> list[Path]:
    """Remove the temporary files a killed writer of `target` left beside it; return them.
    Only one process may write a given output at a time (see the README)."""
    pattern = os.path.join(glob.escape(str(target.parent)), "." + glob.escape(target.name) + ".*")
    removed = []
    for p in glob.glob(pattern):
        if p.endswith((".part" + target.suffix, *_STALE_ENDINGS)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
                removed.append(Path(p))
    return removed
