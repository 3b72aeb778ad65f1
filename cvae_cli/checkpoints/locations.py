"""Where weights live when nobody says: the per-user folder `cvae inflate` writes to, and the small
model that ships inside the package."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ..errors import CvaeError

BUILTIN_WEIGHTS = "cvae-small.safetensors"  # shipped in the package (`weights/` in the source tree)
INFLATED_WEIGHTS = "cvae-tail.safetensors"  # what `cvae inflate` writes by default


def data_dir() -> Path:
    """The per-user folder for weights `cvae inflate` makes: $CVAE_HOME, else $XDG_DATA_HOME/cvae,
    else ~/.local/share/cvae. Never relative to the current directory, so every command finds them."""
    if os.environ.get("CVAE_HOME"):
        return Path(os.environ["CVAE_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "cvae"


def inflated_weights(init: str = "tail", arch: str = "v1.0.0", norm: str = "frame") -> Path:
    """Where `cvae inflate` writes when not told: the default weights for its defaults, and for any
    other choice a name that says how they were made."""
    default = (init, arch, norm) == ("tail", "v1.0.0", "frame")
    return data_dir() / (INFLATED_WEIGHTS if default else f"cvae-{init}-{arch}-{norm}.safetensors")


def builtin_weights() -> Path | None:
    """The small model that ships with cvae (trained on a CPU from real package data), if installed."""
    try:
        path = resources.files("cvae_cli.weights") / BUILTIN_WEIGHTS
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def default_weights() -> tuple[Path, bool]:
    """(weights, whether they are the built-in small model): the SD VAE inflated by `cvae inflate`
    when there is one, else the built-in model."""
    inflated = inflated_weights()
    if inflated.is_file():
        return inflated, False
    builtin = builtin_weights()
    if builtin is None:
        raise CvaeError(f"no weights: run `cvae inflate` (writes {inflated}) or pass --weights")
    return builtin, True

