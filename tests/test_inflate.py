"""Inflation against the image VAE it comes from: diffusers' AutoencoderKL is the oracle."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cvae_cli.checkpoints import load_model, provenance, save_model, sd_vae_to_compvis, weights_info
from cvae_cli.errors import CvaeError
from cvae_cli.inflate import inflate
from conftest import random_model, rel_err

diffusers = pytest.importorskip("diffusers")

LEVELS, BLOCKS = 4, 2
NO_TIME = dict(encoder_temporal_downsample=("",) * LEVELS, decoder_temporal_upsample=("",) * LEVELS)
SD_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * LEVELS,
                 up_block_types=("UpDecoderBlock2D",) * LEVELS, block_out_channels=(32, 32, 64, 64),
                 layers_per_block=BLOCKS, norm_num_groups=32, latent_channels=4)


@pytest.fixture(scope="module")
def sd_vae():
    """A narrow random SD VAE; its GroupNorm affines are perturbed so that norms matter."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**SD_CONFIG).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return vae


def compvis_from_diffusers(sd: dict) -> dict:
    """The CompVis (original SD) layout, written out block by block; checked against diffusers' own
    converter in `test_hand_written_compvis_layout_matches_diffusers_converter`."""
    blocks = {}
    for part in ("encoder", "decoder"):
        blocks.update({f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.",
                       f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2.",
                       f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1.",
                       f"{part}.conv_norm_out.": f"{part}.norm_out."})
    for i in range(LEVELS):
        for j in range(BLOCKS):
            blocks[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(BLOCKS + 1):
            blocks[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{LEVELS - 1 - i}.block.{j}."
        blocks[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        blocks[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{LEVELS - 1 - i}.upsample."
    leaves = {"conv_shortcut.": "nin_shortcut.", "group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.",
              "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for key, value in sd.items():
        prefix = next((p for p in blocks if key.startswith(p)), "")
        rest = key[len(prefix):]
        leaf = next((l for l in leaves if rest.startswith(l)), "")
        new = blocks.get(prefix, prefix) + leaves.get(leaf, leaf) + rest[len(leaf):]
        out[new] = value[:, :, None, None] if ".attn_1." in new and value.ndim == 2 else value
    return out


def old_diffusers_names(sd: dict) -> dict:
    """diffusers < 0.15 called the attention's parts query/key/value/proj_attn."""
    names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for key, value in sd.items():
        for new, old in names.items():
            key = key.replace(new, old)
        out[key] = value
    return out


def test_hand_written_compvis_layout_matches_diffusers_converter(sd_vae):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = sd_vae.state_dict()
    compvis = compvis_from_diffusers(sd)
    assert {"encoder.down.0.block.0.conv1.weight", "encoder.down.2.block.0.nin_shortcut.weight",
            "encoder.down.2.downsample.conv.weight", "encoder.mid.attn_1.q.weight", "decoder.up.3.upsample.conv.weight",
            "decoder.up.1.block.0.nin_shortcut.weight", "decoder.up.0.block.2.conv2.weight",
            "decoder.norm_out.weight", "quant_conv.weight"} <= set(compvis)
    assert compvis["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    back = convert_ldm_vae_checkpoint(compvis, SD_CONFIG)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_sd_vae_to_compvis_reads_both_layouts(sd_vae):
    sd = sd_vae.state_dict()
    expected = compvis_from_diffusers(sd)
    for layout in (sd, old_diffusers_names(sd), expected):
        got = sd_vae_to_compvis(layout)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_all_files_and_layouts_inflate_to_the_same_weights(sd_vae, tmp_path):
    sd = {k: v.contiguous() for k, v in sd_vae.state_dict().items()}
    compvis = compvis_from_diffusers(sd)
    save_file(sd, str(tmp_path / "diffusers.safetensors"))
    save_file(compvis, str(tmp_path / "compvis.safetensors"))
    torch.save(compvis, tmp_path / "compvis.bin")
    torch.save(old_diffusers_names(sd), tmp_path / "old-diffusers.bin")
    full = {f"first_stage_model.{k}": v for k, v in compvis.items()}
    full.update({"first_stage_model.loss.logvar": torch.zeros(()), "model.diffusion_model.input.weight": torch.ones(3),
                 "cond_stage_model.transformer.weight": torch.ones(2)})
    torch.save({"state_dict": full, "global_step": 7}, tmp_path / "sd-full.ckpt")
    reference = inflate(sd).state_dict()
    for name in ("diffusers.safetensors", "compvis.safetensors", "compvis.bin", "old-diffusers.bin", "sd-full.ckpt"):
        got = inflate(tmp_path / name).state_dict()
        assert got.keys() == reference.keys(), name
        assert all(torch.equal(got[k], reference[k]) for k in reference), name


def test_inits_place_the_2d_kernel_on_their_taps(sd_vae):
    compvis = compvis_from_diffusers(sd_vae.state_dict())
    w = compvis["encoder.down.0.block.0.conv1.weight"]
    zero = torch.zeros_like(w)
    taps = {"tail": [zero, zero, w], "center": [zero, w, zero], "average": [w / 3] * 3}
    for init, expected in taps.items():
        sd = inflate(compvis, init=init).state_dict()
        assert torch.equal(sd["encoder.down.0.block.0.conv1.conv.weight"], torch.stack(expected, dim=2)), init
        # one-tap kernels: the 2-D weight with a time axis of 1, whatever the init
        assert torch.equal(sd["encoder.down.0.downsample.conv.conv.weight"],
                           compvis["encoder.down.0.downsample.conv.weight"][:, :, None])
        assert torch.equal(sd["decoder.up.1.upsample.conv.conv.weight"],
                           compvis["decoder.up.1.upsample.conv.weight"][:, :, None])
        assert torch.equal(sd["encoder.mid.attn_1.q.conv.weight"], compvis["encoder.mid.attn_1.q.weight"][:, :, None])
        assert torch.equal(sd["quant_conv.conv.weight"], compvis["quant_conv.weight"][:, :, None])
        assert torch.equal(sd["decoder.norm_out.bias"], compvis["decoder.norm_out.bias"])
        assert torch.equal(sd["encoder.down.0.block.0.conv1.conv.bias"], compvis["encoder.down.0.block.0.conv1.bias"])


def test_inflated_layout_and_provenance(sd_vae):
    model = inflate(sd_vae.state_dict())
    cfg = model.config
    assert (cfg.hidden_size, cfg.hidden_size_mult, cfg.num_res_blocks, cfg.z_channels, cfg.embed_dim) == \
        (32, (1, 1, 2, 2), 2, 4, 4)
    assert (cfg.norm, cfg.encoder_attention, cfg.decoder_attention) == ("frame", "AttnBlock3DFix", "AttnBlock3DFix")
    assert cfg.encoder_temporal_downsample == ("TimeDownsample2x",) * 2 + ("", "")  # v1.0.0's layout
    assert cfg.decoder_temporal_upsample == ("", "") + ("TimeUpsample2x",) * 2
    assert provenance(model) == {"init": "tail", "arch": "v1.0.0", "source": "state dict"}
    assert inflate(sd_vae.state_dict(), norm="clip").config.norm == "clip"


@pytest.mark.parametrize("init", ["tail", "center", "average"])
@torch.no_grad()
def test_every_init_reproduces_the_image_vae_on_an_image(sd_vae, init):
    model = inflate(sd_vae.state_dict(), init=init)
    x = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    ref = sd_vae.encode(x[:, :, 0]).latent_dist
    post = model.encode(x)
    assert rel_err(post.mean[:, :, 0], ref.mean) < 1e-5
    assert rel_err(post.logvar[:, :, 0], ref.logvar) < 1e-5
    z = torch.randn(1, 4, 1, 4, 4)
    assert rel_err(model.decode(z)[:, :, 0], sd_vae.decode(z[:, :, 0]).sample) < 1e-5


@torch.no_grad()
def per_frame(sd_vae, x):
    """The image VAE on every frame of (1, 3, T, H, W): latent means and reconstructions."""
    frames = x[0].transpose(0, 1)
    mean = sd_vae.encode(frames).latent_dist.mean
    return mean.transpose(0, 1)[None], sd_vae.decode(mean).sample.transpose(0, 1)[None]


def panning_clip(speed: int, frames: int = 5) -> torch.Tensor:
    """A smooth random picture moving `speed` pixels per frame (0: a still clip), (1, 3, T, 32, 32)."""
    torch.manual_seed(1)
    picture = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8) * 2 - 1, size=(64, 64), mode="bilinear")
    return torch.stack([picture.roll(speed * t, dims=-1)[..., :32, :32] for t in range(frames)], dim=2)


@torch.no_grad()
def test_tail_init_is_the_image_vae_frame_by_frame(sd_vae):
    model = inflate(sd_vae.state_dict(), init="tail", **NO_TIME)
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1  # every frame different: the most motion there is
    ref_z, ref_x = per_frame(sd_vae, clip)
    z = model.encode(clip).mean
    assert rel_err(z, ref_z) < 1e-5
    assert rel_err(model.decode(z), ref_x) < 1e-5


@torch.no_grad()
def test_center_init_accumulates_error_with_depth_and_motion(sd_vae):
    """Center init looks one frame into the past at every 3-D conv: right on a still clip and on
    frame 0 (causal padding repeats it), wrong from frame 1 on, worse the deeper and the faster."""
    model = inflate(sd_vae.state_dict(), init="center", **NO_TIME)
    still = panning_clip(0)
    assert rel_err(model.decode(model.encode(still).mean), per_frame(sd_vae, still)[1]) < 2e-5  # the levers fold time taps: float32 rounding, not 1e-5 exactly
    errors = {}
    for speed in (1, 2):
        clip = panning_clip(speed)
        ref_z, ref_x = per_frame(sd_vae, clip)
        ref_h = sd_vae.encoder.conv_in(clip[0].transpose(0, 1)).transpose(0, 1)[None]
        h, z = model.encoder.conv_in(clip), model.encode(clip).mean
        x = model.decode(z)
        assert rel_err(z[:, :, :1], ref_z[:, :, :1]) < 1e-5 and rel_err(x[:, :, :1], ref_x[:, :, :1]) < 2e-5
        errors[speed] = [rel_err(a[:, :, 1:], b[:, :, 1:]) for a, b in ((h, ref_h), (z, ref_z), (x, ref_x))]
    for speed, (after_conv_in, after_encoder, after_decoder) in errors.items():
        assert 0.05 < after_conv_in < after_encoder < after_decoder, (speed, errors)
    # faster motion, larger error (the reconstruction's error is near 1 at both speeds: saturated)
    assert errors[1][0] < errors[2][0] and errors[1][1] < errors[2][1], errors


def test_random_init_loads_nothing_but_keeps_the_sd_size(sd_vae):
    tail = inflate(sd_vae.state_dict()).state_dict()
    torch.manual_seed(5)
    a = inflate(sd_vae.state_dict(), init="random")
    torch.manual_seed(5)
    b = inflate(sd_vae.state_dict(), init="random").state_dict()
    sd = a.state_dict()
    assert provenance(a)["init"] == "random"
    assert sd.keys() == tail.keys() and all(sd[k].shape == tail[k].shape for k in sd)
    assert all(torch.equal(sd[k], b[k]) for k in sd)  # seeded by torch's RNG
    assert not torch.equal(sd["encoder.conv_in.conv.weight"], tail["encoder.conv_in.conv.weight"])
    assert not torch.equal(sd["encoder.down.0.block.0.conv1.conv.bias"], tail["encoder.down.0.block.0.conv1.conv.bias"])


@torch.no_grad()
def test_v1_1_0_layout_takes_2d_weights_straight_and_keeps_fresh_temporal_layers(sd_vae):
    compvis = compvis_from_diffusers(sd_vae.state_dict())
    model = inflate(compvis, arch="v1.1.0")
    sd = model.state_dict()
    assert model.config.encoder_resnet_blocks[:2] == ("ResnetBlock2D",) * 2 and model.config.norm == "frame"
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.1.conv2.weight",
                "encoder.down.1.downsample.conv.weight"):
        assert torch.equal(sd[key], compvis[key])
    assert torch.equal(sd["encoder.down.2.block.0.conv1.conv.weight"][:, :, 2],
                       compvis["encoder.down.2.block.0.conv1.weight"])
    assert sd["encoder.down.1.time_downsample.mix_factor"].tolist() == [2.0]
    assert sd["decoder.up.3.time_upsample.mix_factor"].tolist() == [2.0]
    # With the learned temporal branches switched off (sigmoid(100) == 1), an image passes as in SD.
    for key, p in model.named_parameters():
        if key.endswith("mix_factor"):
            p.fill_(100.0)
    x = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    assert rel_err(model.encode(x).mean[:, :, 0], sd_vae.encode(x[:, :, 0]).latent_dist.mean) < 1e-5


@pytest.mark.parametrize("arch", ["v1.0.0", "v1.1.0"])
def test_inflated_model_saves_and_loads_with_its_provenance(sd_vae, tmp_path, arch):
    model = inflate(sd_vae.state_dict(), arch=arch, init="average")
    path = save_model(model, tmp_path / "vae.safetensors", source="sd-vae-ft-mse")
    info = weights_info(path)
    assert (info["init"], info["arch"], info["source"]) == ("average", arch, "sd-vae-ft-mse")
    loaded = load_model(path)
    assert loaded.config == model.config
    sd, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_wrong_state_dicts_are_refused_by_name(sd_vae):
    with pytest.raises(CvaeError, match=r"^not an SD VAE state dict: missing encoder\.conv_in\.weight$"):
        inflate({"foo.weight": torch.zeros(3), "bar": torch.ones(2)})
    osp = random_model().state_dict()  # an Open-Sora-Plan / cvae video checkpoint
    with pytest.raises(CvaeError, match=r"missing encoder\.conv_in\.weight .*needs no inflating"):
        inflate(osp)
    compvis = compvis_from_diffusers(sd_vae.state_dict())
    del compvis["decoder.up.2.block.1.norm2.bias"]
    with pytest.raises(CvaeError, match=r"missing decoder\.up\.2\.block\.1\.norm2\.bias$"):
        inflate(compvis)
    compvis = compvis_from_diffusers(sd_vae.state_dict())
    compvis["encoder.mid.attn_1.k.weight"] = torch.zeros(64, 32, 1, 1)
    with pytest.raises(CvaeError, match=r"unexpected shape for encoder\.mid\.attn_1\.k\.weight: \(64, 32, 1, 1\)"):
        inflate(compvis)


def test_bad_arguments_are_refused(sd_vae):
    sd = sd_vae.state_dict()
    with pytest.raises(CvaeError, match="--init middle: use one of tail, center, average, random"):
        inflate(sd, init="middle")
    with pytest.raises(CvaeError, match=r"--arch v2: use one of v1\.0\.0, v1\.1\.0"):
        inflate(sd, arch="v2")
    with pytest.raises(CvaeError, match="--norm batch: use one of clip, frame"):
        inflate(sd, norm="batch")
    with pytest.raises(CvaeError, match="has nothing for encoder.down.0.attn.0.norm.weight"):
        inflate(sd, attn_resolutions=(256,))  # attention in level 0: the SD VAE has none there
