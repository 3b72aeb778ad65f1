"""Foreign layouts of the SD image VAE's names: diffusers' `AutoencoderKL` and CompVis (ours).

`LAYOUT` is the one table of how the names correspond; `rename` reads it in either direction, so
that reading an SD VAE (`sd_vae_to_compvis`) and writing one (`compvis_to_diffusers`) cannot drift
apart. `inflate.py` only ever sees CompVis names.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import CvaeError

_RESNET = (("conv_shortcut.", "nin_shortcut."),)
_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
# (diffusers prefix, CompVis prefix, names inside the block). `{part}` is encoder or decoder, `{i}`
# and `{j}` are indices; `{up}` counts the decoder's levels from the other end: diffusers' up_blocks
# run from the lowest resolution up, CompVis' `up` from the highest down.
LAYOUT = (
    ("encoder.down_blocks.{i}.resnets.{j}.", "encoder.down.{i}.block.{j}.", _RESNET),
    ("encoder.down_blocks.{i}.downsamplers.0.", "encoder.down.{i}.downsample.", ()),
    ("decoder.up_blocks.{up}.resnets.{j}.", "decoder.up.{up}.block.{j}.", _RESNET),
    ("decoder.up_blocks.{up}.upsamplers.0.", "decoder.up.{up}.upsample.", ()),
    ("{part}.mid_block.resnets.0.", "{part}.mid.block_1.", _RESNET),
    ("{part}.mid_block.resnets.1.", "{part}.mid.block_2.", _RESNET),
    ("{part}.mid_block.attentions.0.", "{part}.mid.attn_1.", _ATTENTION),
    ("{part}.conv_norm_out.", "{part}.norm_out.", ()),
)
# diffusers < 0.15 named the attention's parts otherwise: read, never written.
_OLD_ATTENTION = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0."))
_FIELD = {"part": r"(?P<part>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "up": r"(?P<up>\d+)"}
_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(_FIELD[p] if k % 2 else re.escape(p) for k, p in enumerate(parts)))


_PATTERNS = {template: _pattern(template) for row in LAYOUT for template in row[:2]}


def _up_levels(sd: dict[str, torch.Tensor], to_compvis: bool) -> int:
    levels = r"decoder\.up_blocks\.(\d+)\." if to_compvis else r"decoder\.up\.(\d+)\."
    return 1 + max((int(m[1]) for k in sd if (m := re.match(levels, k))), default=-1)


def _rename_inner(rest: str, names: tuple[tuple[str, str], ...], to_compvis: bool) -> str:
    for diffusers, compvis in names:
        old, new = (diffusers, compvis) if to_compvis else (compvis, diffusers)
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def rename(sd: dict[str, torch.Tensor], to_compvis: bool) -> dict[str, torch.Tensor]:
    """Every key renamed by `LAYOUT`, diffusers -> CompVis or back; the attention's Linear weights
    (C, C) become 1x1 convs (C, C, 1, 1) in CompVis, and back."""
    ups = _up_levels(sd, to_compvis)
    out = {}
    for key, value in sd.items():
        for diffusers, compvis, inner in LAYOUT:
            source, target = (diffusers, compvis) if to_compvis else (compvis, diffusers)
            m = _PATTERNS[source].match(key)
            if m is None:
                continue
            fields = m.groupdict()
            if "up" in fields:
                fields["up"] = ups - 1 - int(fields["up"])
            rest = key[m.end():]
            if inner is _ATTENTION:
                rest = _rename_inner(rest, _OLD_ATTENTION, True) if to_compvis else rest
                if rest.endswith("weight") and value.ndim == (2 if to_compvis else 4):
                    value = value[:, :, None, None] if to_compvis else value[:, :, 0, 0]
            key = target.format(**fields) + _rename_inner(rest, inner, to_compvis)
            break
        out[key] = value
    return out


def compvis_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CompVis names -> diffusers' `AutoencoderKL` names: what diffusers (and `cvae inflate --from`) read."""
    return rename(sd, to_compvis=False)


def sd_vae_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Widths and depth of a CompVis-named SD VAE, read off its tensor shapes."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            hint = (" (this is a video VAE checkpoint; it needs no inflating: load it as weights)"
                    if "encoder.conv_in.conv.weight" in sd else "")
            raise CvaeError(f"not an SD VAE state dict: missing {key}{hint}")
        if sd[key].ndim != 4:
            raise CvaeError(f"not an SD VAE state dict: unexpected shape for {key}: {tuple(sd[key].shape)}")
        return tuple(sd[key].shape)

    ch, cin = shape("encoder.conv_in.weight")[:2]
    levels = max(1, sum(1 for k in sd if re.fullmatch(r"encoder\.down\.\d+\.block\.0\.conv1\.weight", k)))
    return dict(
        hidden_size=ch, in_channels=cin,
        hidden_size_mult=tuple(max(1, shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch)
                               for i in range(levels)),
        num_res_blocks=max(1, sum(1 for k in sd if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k))),
        z_channels=shape("encoder.conv_out.weight")[0] // 2,  # double_z: mean and logvar
        embed_dim=shape("quant_conv.weight")[0] // 2,
        out_channels=shape("decoder.conv_out.weight")[0],
    )


def sd_vae_to_compvis(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD image VAE in either layout (or inside a full SD checkpoint) -> CompVis names.

    Non-VAE keys (the UNet, the text encoder, `loss.*`) are dropped. Whether every tensor is there
    with the right shape is checked against the model built from it (`inflate.check_image_vae`).
    """
    sd = dict(state_dict)
    for prefix in ("first_stage_model.", "vae."):  # a full SD checkpoint carries the VAE under one
        if any(k.startswith(prefix + "encoder.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    sd = {k: v for k, v in sd.items() if k.startswith(_VAE_PREFIXES)}
    if any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in sd):
        sd = rename(sd, to_compvis=True)
    return sd


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], problem: str,
                 strict: bool = False) -> None:
    """Name the first missing, misshapen (or, if `strict`, unexpected) tensor in a one-line error."""
    for key, shape in expected.items():
        if key not in state:
            raise CvaeError(f"{problem}: missing {key}")
        if tuple(state[key].shape) != shape:
            raise CvaeError(f"{problem}: unexpected shape for {key}: {tuple(state[key].shape)} (expected {shape})")
    for key in state if strict else ():
        if key not in expected:
            raise CvaeError(f"{problem}: unexpected weight {key}")

