"""Reading weight files: safetensors, PyTorch pickles (tensors only) and released folders, on the CPU."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import CvaeError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "model.safetensors")


def one_line(e: BaseException) -> str:
    """The first line of an exception's message, for errors that must fit on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def weights_file(folder: Path, names: tuple[str, ...] = WEIGHT_FILES) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CvaeError(f"{folder} holds no weights file (looked for {', '.join(names)})")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors, .bin, .ckpt or .pt file (or a diffusers folder), on the CPU.

    Pickles are read with `weights_only=True`: a checkpoint cannot run code on this machine.
    """
    path = Path(path)
    if path.is_dir():
        path = weights_file(path)
    if not path.exists():
        raise CvaeError(f"no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, pickled objects...: the user gave a bad file
        kind = "safetensors" if path.suffix == ".safetensors" else "a PyTorch checkpoint of tensors"
        raise CvaeError(f"{path} is not a readable weights file (expected {kind}): {one_line(e)}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning / SD .ckpt
        sd = sd["state_dict"]
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(sd, dict) else {}
    if not tensors:
        raise CvaeError(f"{path} is not a readable weights file: it holds no named tensors")
    return tensors


def safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CvaeError(f"{path} is not a readable weights file: {one_line(e)}") from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CvaeError(f"{path} is not a readable config: {one_line(e)}") from None
    if not isinstance(d, dict):
        raise CvaeError(f"{path} is not a readable config: not a JSON object")
    return d
