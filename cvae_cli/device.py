"""Where the model runs and in what precision: the one resolver for "auto", "is this CUDA?", and
the one dtype table.

Everything downstream (streaming, writers) reads the device and dtype off the model itself, so the
choice is made once, here, when the model is placed.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .errors import CvaeError


class Dtype(NamedTuple):
    torch: torch.dtype
    safetensors: str  # the tag in a safetensors header
    numpy: type  # a numpy dtype holding the same bytes (numpy has no bf16: its raw bits)


# Every dtype cvae stores or computes in, by the name latent files and messages use.
DTYPES: dict[str, Dtype] = {
    "float32": Dtype(torch.float32, "F32", np.float32),
    "float16": Dtype(torch.float16, "F16", np.float16),
    "bfloat16": Dtype(torch.bfloat16, "BF16", np.uint16),
}
# Every spelling a user or a config may use for a compute dtype.
SPELLINGS = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
             "fp16": "float16", "float16": "float16", "half": "float16"}


def dtype_named(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in SPELLINGS:
        raise CvaeError(f"dtype {name}: use auto, fp32, bf16 or fp16")
    return DTYPES[SPELLINGS[name]].torch


def dtype_name(dtype: torch.dtype) -> str:
    """float32, bfloat16 or float16: how latent files and messages spell a dtype."""
    return str(dtype).removeprefix("torch.")


def safetensors_dtype(tag: str) -> str:
    """A safetensors header's dtype tag (F32, BF16, ...) as cvae spells dtypes (float32, bfloat16, ...)."""
    names = {d.safetensors: name for name, d in DTYPES.items()}
    return names.get(tag, "float64" if tag == "F64" else tag.lower())


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def resolve(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
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
    if is_cuda(place):
        if not torch.cuda.is_available():
            raise CvaeError(f"--device {device}: no CUDA GPU is visible to this torch build")
        if place.index is None:
            place = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    if dtype == "auto":
        return place, torch.bfloat16 if is_cuda(place) else torch.float32
    try:
        return place, dtype_named(dtype)
    except CvaeError:
        raise CvaeError(f"--dtype {dtype}: use auto, fp32, bf16 or fp16") from None


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a model's weights: where its inputs must go."""
    p = next(model.parameters())
    return p.device, p.dtype
