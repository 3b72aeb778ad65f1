"""Weights files, released folders, our own .safetensors and the hub cache (offline)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cvae_cli.checkpoints import (fetch_sd_vae, load_model, model_id, provenance, read_state_dict, save_model,
                                  set_provenance, weights_info)
from cvae_cli.errors import CvaeError
from cvae_cli.model import CausalVAE
from conftest import put_in_cache, random_model

# Open-Sora-Plan v1.0.0's config.json as released, shrunk to toy width (training-only fields kept).
RELEASED_CONFIG = {
    "_class_name": "CausalVAEModel", "_diffusers_version": "0.27.2", "attn_resolutions": [],
    "decoder_attention": "AttnBlock3D", "decoder_conv_in": "CausalConv3d", "decoder_conv_out": "CausalConv3d",
    "decoder_mid_resnet": "ResnetBlock3D", "decoder_resnet_blocks": ["ResnetBlock3D"] * 4,
    "decoder_spatial_upsample": ["", "SpatialUpsample2x", "SpatialUpsample2x", "SpatialUpsample2x"],
    "decoder_temporal_upsample": ["", "", "TimeUpsample2x", "TimeUpsample2x"], "double_z": True, "dropout": 0.0,
    "embed_dim": 4, "encoder_attention": "AttnBlock3D", "encoder_conv_in": "CausalConv3d",
    "encoder_conv_out": "CausalConv3d", "encoder_mid_resnet": "ResnetBlock3D",
    "encoder_resnet_blocks": ["ResnetBlock3D"] * 4,
    "encoder_spatial_downsample": ["SpatialDownsample2x", "SpatialDownsample2x", "SpatialDownsample2x", ""],
    "encoder_temporal_downsample": ["TimeDownsample2x", "TimeDownsample2x", "", ""],
    "hidden_size": 32, "hidden_size_mult": [1, 1, 2, 2],
    "loss_params": {"disc_start": 2001, "disc_weight": 0.5, "kl_weight": 1e-06, "logvar_init": 0.0},
    "loss_type": "opensora.models.ae.videobase.losses.LPIPSWithDiscriminator", "lr": 1e-05, "num_res_blocks": 1,
    "q_conv": "CausalConv3d", "resolution": 256, "z_channels": 4,
}


def assert_same_weights(a: CausalVAE, b: CausalVAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def released_folder(folder: Path, model: CausalVAE, config: dict | None = None, weights: str = "safetensors",
                    edit=None) -> Path:
    """A folder as Open-Sora-Plan releases it: config.json and weights carrying its training loss."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or RELEASED_CONFIG))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)})
    if edit:
        edit(sd)
    if weights == "safetensors":
        save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(sd, folder / "pytorch_model.bin")
    return folder


def raises_one_line(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(CvaeError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# --- reading files --------------------------------------------------------------------------------

def test_read_state_dict_reads_every_format(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4.0)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.bin")
    torch.save({"state_dict": sd, "global_step": 3, "epoch": 1}, tmp_path / "w.ckpt")
    torch.save(sd, tmp_path / "w.pt")
    (tmp_path / "folder").mkdir()
    shutil.copy(tmp_path / "w.safetensors", tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    for name in ("w.safetensors", "w.bin", "w.ckpt", "w.pt", "folder"):
        got = read_state_dict(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name


class NotATensor:
    pass


def test_unreadable_files_give_one_clear_line(tmp_path):
    save_file({"a": torch.randn(64, 64)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    raises_one_line(r"cut\.safetensors is not a readable weights file \(expected safetensors\): ", read_state_dict, tmp_path / "cut.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"this is not a checkpoint")
    raises_one_line(r"junk\.bin is not a readable weights file \(expected a PyTorch checkpoint of tensors\): ",
                    read_state_dict, tmp_path / "junk.bin")
    torch.save({"a": NotATensor()}, tmp_path / "pickled.ckpt")  # weights_only refuses foreign objects
    raises_one_line(r"pickled\.ckpt is not a readable weights file \(expected a PyTorch checkpoint of tensors\): ", read_state_dict, tmp_path / "pickled.ckpt")
    torch.save({"step": 3}, tmp_path / "empty.pt")
    raises_one_line("holds no named tensors", read_state_dict, tmp_path / "empty.pt")
    raises_one_line(r"^no such file: .*missing\.bin$", read_state_dict, tmp_path / "missing.bin")
    raises_one_line(r"cut\.safetensors is not a readable weights file", load_model, tmp_path / "cut.safetensors")


# --- released folders -----------------------------------------------------------------------------

def test_released_folder_round_trips_through_load_model(tmp_path):
    model = random_model()
    for weights in ("safetensors", "bin"):
        folder = released_folder(tmp_path / weights, model, weights=weights)
        loaded = load_model(str(folder))
        assert_same_weights(loaded, model)
        assert loaded.config.to_dict() == model.config.to_dict() and loaded.config.norm == "clip"
        assert not hasattr(loaded.config, "lr") and not loaded.training  # training fields dropped on reading
        assert provenance(loaded) == {"source": str(folder)}
    frame = load_model(tmp_path / "safetensors", norm="frame")
    assert frame.config.norm == "frame" and all(m.per_frame for m in frame.modules() if hasattr(m, "per_frame"))
    # the weights file itself, with config.json beside it, is as good as the folder
    assert_same_weights(load_model(tmp_path / "safetensors" / "diffusion_pytorch_model.safetensors"), model)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    model = random_model()
    folder = released_folder(tmp_path / "a", model, edit=lambda sd: sd.pop("decoder.mid.attn_1.k.conv.bias"))
    raises_one_line(rf"^{folder} does not fit its config: missing decoder\.mid\.attn_1\.k\.conv\.bias$",
                    load_model, folder)
    folder = released_folder(tmp_path / "b", model, edit=lambda sd: sd.update({"encoder.extra.weight": torch.ones(1)}))
    raises_one_line(r"does not fit its config: unexpected weight encoder\.extra\.weight$", load_model, folder)
    folder = released_folder(tmp_path / "c", model, config=dict(RELEASED_CONFIG, z_channels=8))
    raises_one_line(r"does not fit its config: unexpected shape for encoder\.conv_out\.conv\.weight: "
                    r"\(8, 64, 3, 3, 3\) \(expected \(16, 64, 3, 3, 3\)\)", load_model, folder)


def test_bad_config_is_refused_with_the_source_named(tmp_path):
    model = random_model()
    folder = released_folder(tmp_path / "a", model, config=dict(RELEASED_CONFIG, encoder_attention="AttnBlock4D"))
    raises_one_line(rf"^{folder}: bad model config: config field encoder_attention: unknown block 'AttnBlock4D'",
                    load_model, folder)
    with pytest.raises(CvaeError, match="norm must be 'clip' or 'frame'"):
        load_model(released_folder(tmp_path / "b", model), norm="batch")
    (tmp_path / "c").mkdir()
    raises_one_line("has no config.json", load_model, tmp_path / "c")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    raises_one_line("carries no model config", load_model, tmp_path / "plain.safetensors")
    raises_one_line(r"^no such file or folder: weights/nothing\.safetensors$",
                    load_model, "weights/nothing.safetensors")


# --- our own files --------------------------------------------------------------------------------

def test_save_model_load_model_round_trip(tmp_path):
    model = random_model(norm="frame")
    set_provenance(model, {"init": "tail", "arch": "v1.0.0", "source": "state dict"})
    path = save_model(model, tmp_path / "out" / "vae.safetensors", source="sd-vae-ft-mse.safetensors", steps=0)
    assert os.listdir(tmp_path / "out") == ["vae.safetensors"]  # no temporary file left behind
    meta = safe_open(str(path), "pt").metadata()
    assert meta == {"format": "cvae-weights", "format_version": "1", "config": model.config.to_json(),
                    "model_id": model_id(model), "init": "tail", "arch": "v1.0.0",
                    "source": "sd-vae-ft-mse.safetensors", "steps": "0"}
    loaded = load_model(path)
    assert_same_weights(loaded, model)
    assert loaded.config == model.config
    assert provenance(loaded) == {"init": "tail", "arch": "v1.0.0", "source": "sd-vae-ft-mse.safetensors", "steps": "0"}
    assert model_id(loaded) == model_id(model) == meta["model_id"]
    half = load_model(path, dtype="bf16")
    assert half.encoder.conv_in.conv.weight.dtype == torch.bfloat16
    assert model_id(half) == model_id(model)  # the id of the weights as read, not of the cast copy
    info = weights_info(path)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["dtype"] == "float32" and info["init"] == "tail" and info["config"] == model.config.to_dict()
    assert info["model_id"] == model_id(model)
    raises_one_line("saved as .safetensors, not vae.pt", save_model, model, tmp_path / "vae.pt")
    meta["format_version"] = "2"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "new.safetensors"), metadata=meta)
    raises_one_line("format_version 2; this cvae reads 1: upgrade cvae", load_model, tmp_path / "new.safetensors")


def test_weights_info_of_a_released_folder_skips_the_loss(tmp_path):
    model = random_model()
    info = weights_info(released_folder(tmp_path / "f", model))
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["tensors"] == len(model.state_dict()) and info["config"]["hidden_size"] == 32
    assert "lr" not in info["config"]


def test_model_id_is_short_stable_and_tells_weights_apart():
    a, b = random_model(seed=0), random_model(seed=0)
    assert len(model_id(a)) == 12 and int(model_id(a), 16) >= 0
    assert model_id(a) == model_id(b)
    with torch.no_grad():
        b.decoder.conv_out.conv.bias[0] += 1e-3
    assert model_id(a) != model_id(b)
    assert model_id(random_model(seed=0, norm="frame")) != model_id(a)  # same tensors, other arithmetic


def test_weights_changed_after_loading_carry_their_own_identity(tmp_path):
    """`cvae train --weights X` loads X, trains it and saves final.safetensors: the file, the model
    in memory and the latents made with either must all name the trained weights, not X."""
    start = save_model(random_model(seed=0, norm="frame"), tmp_path / "x.safetensors")
    model = load_model(start)
    started_as = model_id(model)
    with torch.no_grad():  # a training step, in place
        model.decoder.conv_out.conv.bias.add_(1e-2)
    trained = model_id(model)
    assert trained != started_as
    final = save_model(model, tmp_path / "final.safetensors")
    assert safe_open(str(final), "pt").metadata()["model_id"] == trained == model_id(load_model(final))
    assert model_id(load_model(final, dtype="bf16")) == trained  # a GPU run's cast copy answers alike
    shipped = save_model(load_model(final).half(), tmp_path / "fp16.safetensors")  # as recipes' ship.py
    assert safe_open(str(shipped), "pt").metadata()["model_id"] == model_id(load_model(shipped)) != trained


# --- the hub, offline -----------------------------------------------------------------------------

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache under tmp_path, offline; huggingface_hub reads its settings at
    import time, so its constants are patched as well as the environment."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_repo_loads_from_the_cache_offline(tmp_path, offline_hub):
    model = random_model()
    src = released_folder(tmp_path / "src", model)
    weights = "diffusion_pytorch_model.safetensors"
    put_in_cache(offline_hub, "owner/name", {"vae/config.json": src / "config.json", f"vae/{weights}": src / weights})
    loaded = load_model("owner/name/vae")
    assert_same_weights(loaded, model)
    assert provenance(loaded) == {"source": "owner/name/vae"}
    raises_one_line(r"^cannot download owner/other/vae from the Hugging Face hub \(offline and not in the cache\): "
                    r"pass a local file or folder instead$", load_model, "owner/other/vae")
    raises_one_line(r"^cannot download owner/name from the Hugging Face hub \(offline", load_model, "owner/name")


def test_fetch_sd_vae_from_cache_local_or_not_at_all(tmp_path, offline_hub):
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    assert fetch_sd_vae(tmp_path / "w.safetensors") == tmp_path / "w.safetensors"
    raises_one_line(r"^no such file: .*nope\.ckpt$", fetch_sd_vae, str(tmp_path / "nope.ckpt"))
    raises_one_line(r"^cannot download stabilityai/sd-vae-ft-mse from the Hugging Face hub \(offline and not in "
                    r"the cache\): pass a local file with --from PATH instead$", fetch_sd_vae)
    put_in_cache(offline_hub, "stabilityai/sd-vae-ft-mse",
                 {"diffusion_pytorch_model.safetensors": tmp_path / "w.safetensors"})
    got = fetch_sd_vae()
    assert got.name == "diffusion_pytorch_model.safetensors"
    assert got.read_bytes() == (tmp_path / "w.safetensors").read_bytes()
