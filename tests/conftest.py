"""Shared test helpers: where the Open-Sora-Plan reference outputs live, small random models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cvae_cli.model import CausalVAE, CausalVAEConfig

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("CVAE_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixture_file(version: str) -> Path:
    """The reference file for a release; CI (CVAE_REQUIRE_FIXTURES=1) fails where a checkout skips."""
    path = FIXTURES / f"osp-v{version}.safetensors"
    if not path.exists():
        if os.environ.get("CVAE_REQUIRE_FIXTURES") == "1":
            pytest.fail(f"conformance fixture {path} is missing (set CVAE_FIXTURES)")
        pytest.skip(f"conformance fixture {path} not found: set CVAE_FIXTURES to run conformance tests")
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_config(**overrides) -> CausalVAEConfig:
    """The released 4x8x8 layout at toy width, fast enough for the CPU."""
    fields = dict(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=1)
    fields.update(overrides)
    return CausalVAEConfig(**fields)


def random_model(seed: int = 0, **overrides) -> CausalVAE:
    torch.manual_seed(seed)
    model = CausalVAE(tiny_config(**overrides)).eval()
    with torch.no_grad():  # fresh GroupNorm/mix params are trivial; perturb them so tests can fail
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_out.weight", "mix_factor")):
                p.add_(torch.randn_like(p) * 0.3)
    return model
