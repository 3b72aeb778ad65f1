"""Where the model runs and in what precision: the one resolver for "auto", and the one dtype table.

Everything downstream (streaming, writers) reads the device and dtype off the model itself, so the
choice is made once, here, when the model is placed.
"""
from __future__ import annotations

import torch

from .errors import CvaeError

# Every spelling a user or a config may use for a compute dtype.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def dtype_named(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CvaeError(f"dtype {name}: use auto, fp32, bf16 or fp16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """float32, bfloat16 or float16: how latent files and messages spell a dtype."""
    return str(dtype).removeprefix("torch.")


def resolve(device: str = "auto", dtype: str | torch.dtype = "auto",
            local_rank: int | None = None) -> tuple[torch.device, torch.dtype]:
    """`auto` device: CUDA when visible, else the CPU; `cuda` under torchrun: `cuda:LOCAL_RANK`.
    `auto` dtype: bf16 on a GPU, fp32 on the CPU. A CUDA device always gets its index, so that
    every tensor placed on it compares equal to the model's own device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        place = torch.device(device)
    except RuntimeError:
        raise CvaeError(f"--device {device}: expected cpu, cuda or cuda:N") from None
    if place.type == "cuda":
        if not torch.cuda.is_available():
            raise CvaeError(f"--device {device}: no CUDA GPU is visible to this torch build")
        if place.index is None:
            place = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    if dtype == "auto":
        return place, torch.bfloat16 if place.type == "cuda" else torch.float32
    try:
        return place, dtype_named(dtype)
    except CvaeError:
        raise CvaeError(f"--dtype {dtype}: use auto, fp32, bf16 or fp16") from None


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a model's weights: where its inputs must go."""
    p = next(model.parameters())
    return p.device, p.dtype
