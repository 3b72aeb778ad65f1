"""The model against Open-Sora-Plan's own outputs, and its input checks."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from cvae_cli.checkpoints import config_from_json
from cvae_cli.errors import CvaeError
from cvae_cli.model import CausalVAE, CausalVAEConfig, DiagonalGaussian, Levers, v1_1_0_config
from conftest import fixture_file, random_model, rel_err


def load_reference(version: str):
    f = safe_open(str(fixture_file(version)), "pt")
    config = config_from_json(json.loads(f.metadata()["config"]))  # training-only fields dropped
    model = CausalVAE(config).eval()
    model.load_state_dict({k[len("model."):]: f.get_tensor(k).float() for k in f.keys() if k.startswith("model.")},
                          strict=True)
    return f, model


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
@pytest.mark.parametrize("frames", [1, 9, 17])
@torch.no_grad()
def test_reproduces_open_sora_plan(version, frames):
    f, model = load_reference(version)
    x = f.get_tensor(f"input.t{frames}")
    moments = model.quant_conv(model.encoder(x))
    assert rel_err(moments, f.get_tensor(f"moments.t{frames}")) < 1e-4
    decoded = model.decode(DiagonalGaussian.from_moments(moments).mode())
    assert rel_err(decoded, f.get_tensor(f"decoded.t{frames}")) < 1e-4


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_released_config_builds_full_size_model(version):
    f = safe_open(str(fixture_file(version)), "pt")
    released = json.loads(f.metadata()["released_config"])
    model = CausalVAE(config_from_json(released))
    keys = {k for k in model.state_dict()}
    assert "encoder.conv_in.weight" in keys if version == "1.1.0" else "encoder.conv_in.conv.weight" in keys
    if version == "1.0.0":  # the released model: 229 M parameters
        assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 229) < 1


def test_v1_1_0_helper_matches_released_layout():
    f = safe_open(str(fixture_file("1.1.0")), "pt")
    released = config_from_json(json.loads(f.metadata()["released_config"]))
    assert v1_1_0_config() == released


def test_released_config_is_read_without_its_training_fields_and_unknown_fields_are_refused():
    released = json.loads(safe_open(str(fixture_file("1.0.0")), "pt").metadata()["released_config"])
    assert {"lr", "loss_type", "loss_params", "_class_name"} <= released.keys()
    assert config_from_json(released) == CausalVAEConfig()  # v1.0.0 is the default layout
    assert config_from_json({**released, "_diffusers_version": "0.x", "lr": 1.0}) == CausalVAEConfig()
    with pytest.raises(CvaeError, match="unknown field 'use_tiling'"):
        config_from_json({**released, "use_tiling": True}, "vae/config.json")


def test_posterior_clamps_logvar_and_samples_reproducibly():
    moments = torch.cat([torch.zeros(1, 4, 1, 2, 2), torch.full((1, 4, 1, 2, 2), 50.0)], dim=1)
    post = DiagonalGaussian.from_moments(moments)
    assert post.logvar.max().item() == 20.0
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(post.sample(generator=g1), post.sample(generator=g2))
    assert not torch.equal(post.sample(), post.mode())


@pytest.mark.parametrize("shape, message", [
    ((3, 5, 16, 16), "pixels must be"),
    ((1, 4, 5, 16, 16), "pixels must be"),
    ((1, 3, 4, 16, 16), "1 + 4k"),
    ((1, 3, 5, 12, 16), "multiples of 8"),
])
def test_bad_input_says_what_to_do(shape, message):
    model = random_model()
    with pytest.raises(ValueError, match=re.escape(message)):
        model.encode(torch.zeros(shape))


@pytest.mark.parametrize("field, value, message", [
    ("encoder_attention", "AttnBlockXL", "unknown block 'AttnBlockXL'"),
    ("encoder_resnet_blocks", ["ResnetBlock3D"] * 3, "expected 4"),
    ("norm", "batch", "norm must be"),
])
def test_config_refuses_unknown_blocks(field, value, message):
    with pytest.raises(ValueError, match=message):
        CausalVAEConfig(**{field: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
@pytest.mark.parametrize("levers", ["plain", "levers"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.no_grad()
def test_reproduces_open_sora_plan_on_cuda(version, levers, dtype, monkeypatch):
    """cuDNN's kernels compute the same function: fp32 (TF32 off) to the CPU's 1e-4; bf16 within the
    rounding that bf16 costs on the CPU too (there 3-4% on the moments, 8-11% decoded, for these
    narrow random fp16 weights)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    f, model = load_reference(version)
    model = model.to("cuda", getattr(torch, dtype)).use_levers(Levers() if levers == "levers" else Levers.off())
    x = f.get_tensor("input.t17").to("cuda", getattr(torch, dtype))
    moments = model.quant_conv(model.encoder(x))
    decoded = model.decode(DiagonalGaussian.from_moments(moments).mode())
    tol = (1e-4, 1e-4) if dtype == "float32" else (0.06, 0.16)
    errors = (rel_err(moments.float().cpu(), f.get_tensor("moments.t17")),
              rel_err(decoded.float().cpu(), f.get_tensor("decoded.t17")))
    print(f"cuda {version} {levers} {dtype}: moments {errors[0]:.2e}, decoded {errors[1]:.2e}")
    assert errors[0] < tol[0] and errors[1] < tol[1]
