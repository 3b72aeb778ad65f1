"""What the CLI's `--fast` and `--compile` switch on: kernel-level levers of the model
(`model.Levers`), each proven on the CPU to compute the plain model's function (tests/test_accel.py).
Measured outcomes, and why channels-last is not among them: benchmarks/README.md."""
from __future__ import annotations

from dataclasses import replace

from .model import CausalVAE


def speed_up(model: CausalVAE, fast: bool = False, compile: bool = False) -> CausalVAE:
    """`fast`: GroupNorm + SiLU fused into one kernel, and on CUDA cuDNN's autotuning; `compile`:
    torch.compile per block. The model's exact levers stay as they are. Call after moving the
    model to its device; returns it."""
    cuda = next(model.parameters()).device.type == "cuda"
    return model.use_levers(replace(model.levers, fused_norm=fast, cudnn_benchmark=fast and cuda, compile=compile))
